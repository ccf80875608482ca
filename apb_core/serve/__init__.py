"""`apb serve`: a warm server with an OpenAI-compatible API over one Session (app: routes, schemas: request
models, cache: the document cache, engine: the one thread that drives the workers)."""
