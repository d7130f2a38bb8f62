"""What the vision server, the language server and the gateway must agree on, in one place each.

The internal gRPC calls' TLS (`grpc_tls`) and shared secret (`grpc_secret`), how the vision and language
servers serve those calls (`grpc_server`), the settings the servers declare alike (`settings`: internal
security for all three, where and how much the vision and language servers serve) and the rule that names an
image by its content (`content_keys`). It sits below the three servers, which never
import each other, so that a rule both ends of a call follow has one definition and nothing here depends on
any server or on the CLI.
"""
