"""The wire: the listener, the call gate (auth, call slots, reading and parsing requests), and
the interceptor that turns domain errors into gRPC statuses. First and last to touch a call."""
