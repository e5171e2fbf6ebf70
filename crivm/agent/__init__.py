"""The in-guest agent: imports only the stdlib, protobuf, crivm.proto and its own modules.

Run as ``python3 -S -m crivm.agent.main`` (the guest's /init calls ``main()`` through ``-c``,
which skips runpy). What the guest must provide:

- python3.11 with asyncio, ctypes (libffi), termios, json and ipaddress; no site-packages;
- the protobuf runtime (the guest image ships the upb backend; pure Python works too), at
  least the version of the protoc that generated ``crivm/proto/agent_pb2.py`` (Debian's
  python3-protobuf is too old);
- ``runc`` on PATH (or ``--runc``), running as root;
- /proc, /sys, devtmpfs on /dev, devpts on /dev/pts (ttys come from /dev/ptmx), a writable /run
  (state in /run/crivm-agent), a writable /etc/resolv.conf, and cgroups at /sys/fs/cgroup
  (v2 or v1 hierarchies; containers go into /crivm/<id>);
- the transport: the virtio-serial port (``CRIVM_AGENT_DEVICE``, default
  /dev/virtio-ports/agent.0, needs virtio_console) or vsock (``CRIVM_AGENT_VSOCK_PORT``,
  default 1024, needs the virtio vsock transport);
- for shared rootfs, the virtiofs module; the agent mounts tags itself with mount(2).
"""
