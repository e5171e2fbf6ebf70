"""Pod networking: pinned network namespaces, the CNI plugin chain, and tap bridging for VMs.

- ``netns``: create/remove pinned netns, run code or programs inside one.
- ``cni_config`` / ``cni_result`` / ``cni``: load the conflist, run ADD/CHECK/DEL, cache results.
- ``tap``: join a VM's tap device to the pod's CNI veth with tc redirects.
"""
