"""Runtime shared by every service of the mesh: configuration, logging, errors, gRPC servers,
channels, authentication and storage."""
