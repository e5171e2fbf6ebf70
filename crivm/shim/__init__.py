"""Host-side helper processes of VM pods: the OCI-runtime CLI that conmon drives for VM
containers, the per-container shim it starts, and the per-pod VM supervisor."""
