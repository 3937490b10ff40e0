"""The soak benchmark's load (locust): searches by id and by upload, flag/unflag, and 5 % hostile
uploads. Every response's status is counted (SOAK_STATUS_FILE) — expected 4xx for hostile files count
as successes, any 5xx as a failure."""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from locust import HttpUser, between, events, task

TOKEN = os.environ.get("SOAK_TOKEN", "bench")
IMAGES = sorted(Path(os.environ["SOAK_IMAGES"]).glob("*.jpg"))
HOSTILE = sorted(Path(os.environ["SOAK_HOSTILE"]).iterdir())
MAX_ID = int(os.environ.get("SOAK_MAX_ID", "100"))
STATUS: Counter[str] = Counter()


class Moderator(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {TOKEN}"
        self.rng = random.Random(id(self))

    def _done(self, name: str, resp, ok: tuple[int, ...] = (200,)) -> None:  # type: ignore[no-untyped-def]
        STATUS[f"{name} {resp.status_code}"] += 1
        if resp.status_code in ok:
            resp.success()
        else:
            resp.failure(f"status {resp.status_code}")

    @task(8)
    def search_by_id(self) -> None:
        with self.client.post("/api/v1/search", json={"id": self.rng.randint(1, MAX_ID), "k": 10,
                                                      "scope": self.rng.choice(["flagged", "all"])},
                              name="search by id", catch_response=True) as r:
            self._done("search_id", r)

    @task(6)
    def search_by_upload(self) -> None:
        f = self.rng.choice(IMAGES)
        with self.client.post("/api/v1/search", files={"image": (f.name, f.read_bytes())},
                              name="search by upload", catch_response=True) as r:
            self._done("search_upload", r)

    @task(5)
    def flag_unflag(self) -> None:
        image_id = self.rng.randint(1, MAX_ID)
        action = self.rng.choice(["flag", "unflag"])
        with self.client.post(f"/api/v1/images/{image_id}/{action}", json={"reason": "soak"},
                              name=f"{action}", catch_response=True) as r:
            self._done(action, r)

    @task(1)
    def hostile_upload(self) -> None:
        f = self.rng.choice(HOSTILE)
        with self.client.post("/api/v1/search", files={"image": (f.name, f.read_bytes())},
                              name="hostile upload", catch_response=True) as r:
            self._done("hostile", r, ok=(200, 400, 413, 415, 503))


@events.quitting.add_listener
def _write_status(environment, **_kw) -> None:  # type: ignore[no-untyped-def]
    Path(os.environ["SOAK_STATUS_FILE"]).write_text(json.dumps(dict(STATUS)))
