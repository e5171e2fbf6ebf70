"""The vm backend as the daemon sees it: pods in QEMU VMs, containers run by the in-guest agent."""
