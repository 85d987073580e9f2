"""Code shared by the p2pchat services: input rules, the error taxonomy and its gRPC mapping."""
