"""Wire protocol of jobworker: generated protobuf/gRPC code, one subpackage per API version."""
