"""crivm: a Kubernetes CRI runtime with trusted pods on runc and untrusted pods in QEMU VMs."""

__version__ = "0.1.0"
