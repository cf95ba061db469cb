"""The HTTP side: the FastAPI app (``api``: health, admin, metrics), the OpenAI-compatible routes
(``openai_api``), request limits (``limits``) and the uvicorn server (``server``). Imports the core below it,
never the command line."""
