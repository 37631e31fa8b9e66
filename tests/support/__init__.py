"""Shared test support: helpers and fixtures every area's tests use (tests/ is on sys.path).

- :mod:`support.paths`: the repository, tests, clients and fakes directories;
- :mod:`support.v4l2_helpers`: raw V4L2 ioctls on a node (in-process or a file descriptor);
- :mod:`support.encoder_client`: an M2M encoder client;
- :mod:`support.mounted`: device-model nodes served on a FUSE mount in-process;
- :mod:`support.daemon`: the real daemon as a subprocess (start, wait, counters);
- :mod:`support.fuse_echo_device`: a transport-level echo device (also a program);
- :mod:`support.fuse_clients`: clients of a mount (subprocesses, other uids);
- :mod:`support.t31_fake`: the fake libimp built and loaded for the t31 backend.

Client programs the tests run live as files in tests/clients/.
"""
