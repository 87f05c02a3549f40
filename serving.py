"""Serving many callers at once: requests that arrive together are captioned as one batch."""

import queue
import threading
import time
from concurrent.futures import Future

from PIL import Image

from captioner import Caption, Captioner
from config import DecodeConfig


class BatchingCaptioner:
    """Serves concurrent callers: requests that arrive together with the same options run as one batch.

    Greedy and beam-search captions do not depend on which other images share the batch (tested), so batching
    only raises throughput. Sampling runs alone, so that a seed reproduces its captions.
    """

    def __init__(self, captioner: Captioner, *, max_batch: int = 8, wait_seconds: float = 0.01):
        self.captioner = captioner
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self._requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="caption-batcher", daemon=True).start()

    def caption(self, image: Image.Image, config: DecodeConfig, *, attention: bool = False) -> Caption:
        """Caption one loaded image; blocks until done. Errors are raised to the callers of the same batch only,
        who asked with the same options."""
        done: Future = Future()
        self._requests.put((image, config, attention, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            pending = [self._requests.get()]
            deadline = time.monotonic() + self.wait_seconds
            while len(pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    pending.append(self._requests.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict = {}
            for request in pending:
                _, config, attention, _ = request
                key = (config, attention) if config.strategy != "sample" else id(request)
                groups.setdefault(key, []).append(request)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list) -> None:
        _, config, attention, _ = group[0]
        try:
            captions = self.captioner.caption([image for image, *_ in group], config, attention=attention)
        except Exception as error:  # handed to every caller of the group; the server thread lives on
            for *_, done in group:
                done.set_exception(error)
            return
        for (*_, done), caption in zip(group, captions, strict=True):
            done.set_result(caption)
