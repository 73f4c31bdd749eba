"""Entry point: `python main.py` serves on HOST:PORT; `uvicorn main:app` works too."""

import logging

import uvicorn

from qwenserve.app import create_app
from qwenserve.config import get_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app()

if __name__ == "__main__":
    settings = get_settings()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
