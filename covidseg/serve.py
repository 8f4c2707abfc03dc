"""Serve a model over HTTP: a page to drop an X-ray on, and a JSON API for other tools.

python -m covidseg.serve ckpt_path=<ckpt|pretrained|pretrained:infection|list|k-fold folder|model.onnx> \
    [host=127.0.0.1] [port=8000]

The settings are checked and the model is loaded once, before the server starts; the app and its
limits are :mod:`covidseg.serving.app`.
"""

from __future__ import annotations

import asyncio
import logging

import hydra
from omegaconf import DictConfig

from covidseg.core.config import CONF_DIR, check_output_folder
from covidseg.core.errors import hydra_errors_in_one_line, user_errors
from covidseg.core.run_files import write_run_info
from covidseg.inference.segment import load_configured_backend
from covidseg.serving.app import check_address, create_app, serve_settings


def quiet_forced_shutdown(record: logging.LogRecord) -> bool:
    """A second Ctrl-C makes uvicorn stop at once, cancelling the app's lifespan task, whose
    traceback Starlette hands uvicorn to log: the record becomes one line that says what happened."""
    cancelled = record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError)
    text = str(record.msg)
    if cancelled or (text.startswith("Traceback") and text.rstrip().endswith("CancelledError")):
        record.msg, record.args, record.exc_info, record.exc_text = "stopped at once by a second Ctrl-C", (), None, None
    return True


@hydra_errors_in_one_line
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    with user_errors():
        check_output_folder(cfg)  # this run's own folder, before anything is written
        settings = serve_settings(cfg)
        check_address(settings)
        write_run_info(cfg.paths.output_dir)
        model = load_configured_backend(cfg)
        app = create_app(model, settings)
    logging.getLogger("uvicorn.error").addFilter(quiet_forced_shutdown)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
