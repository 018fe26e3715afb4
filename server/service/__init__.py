"""The data plane: serving logic shared by every front end (gRPC, HTTP), free of any transport."""
