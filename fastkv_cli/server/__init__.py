"""`fastkv serve`: one loaded model over HTTP, answering fastkv's routes and OpenAI's chat API (see README "Server")."""
