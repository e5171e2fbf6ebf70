"""The in-guest agent: imports only the stdlib, protobuf, crivm.proto and its own modules."""
