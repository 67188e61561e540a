"""The gemini backend through the real google-genai client, against a local server speaking the REST API."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from recsys.content import Content, Part
from recsys.embed.gemini import GeminiEmbedder, RetryPolicy
from tests.fake_gemini import Fault, FakeGemini


@pytest.fixture
def server():
    s = FakeGemini()
    yield s
    s.close()


def make(server, **kw):
    kw.setdefault("retry", RetryPolicy(max_retries=4, base_s=0.01, cap_s=0.05))
    return GeminiEmbedder(api_key=server.api_key, base_url=server.url, **kw)


def png(color="red") -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(b, format="PNG")
    return b.getvalue()


def test_batches_order_prefixes_and_dims(server):
    contents = [Content.of(f"item number {i}", item_id=str(i)) for i in range(230)]
    contents[5] = Content.of("a red poster", Part("image", data=png(), mime_type="image/png"), item_id="5")
    emb = make(server, concurrency=3)
    v = emb.embed(contents, task="document", dim=256)
    assert v.shape == (230, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert sorted(r["n"] for r in server.requests) == [30, 100, 100]  # at most 100 per call
    exp0 = server.expected([("text", b"title: none | text: item number 0")], 256)
    exp5 = server.expected([("text", b"title: none | text: a red poster"), ("image/png", png())], 256)
    assert np.allclose(v[0], exp0, atol=1e-5) and np.allclose(v[5], exp5, atol=1e-5)
    q = emb.embed([Content.of("item number 0")], task="query", dim=128)
    assert np.allclose(q[0], server.expected([("text", b"task: search result | query: item number 0")], 128), atol=1e-5)


def test_retries_on_429_honour_retry_after_then_succeed(server):
    server.faults = [Fault("429", retry_after=1.0), Fault("500"), Fault("503")]
    emb = make(server)
    t0 = time.time()
    v = emb.embed([Content.of("hello")], dim=128)
    assert time.time() - t0 >= 1.0  # waited at least what the server asked
    assert emb.stats["retries"] == 3 and len(server.requests) == 4
    assert np.allclose(v[0], server.expected([("text", b"title: none | text: hello")], 128), atol=1e-5)


def test_timeouts_and_malformed_bodies_are_retried(server):
    server.faults = [Fault("slow", delay_s=2.5), Fault("malformed"), Fault("short"), Fault("nan")]
    emb = make(server, timeout_s=1.0)
    v = emb.embed([Content.of("a"), Content.of("b")], dim=128)
    assert v.shape == (2, 128) and emb.stats["retries"] == 4


def test_a_bad_item_fails_alone(server):
    contents = [Content.of(f"fine {i}", item_id=f"ok{i}") for i in range(9)]
    contents.insert(4, Content.of("POISON pill", item_id="bad"))
    emb = make(server)
    result = emb.embed_many(contents, dim=128)
    assert [e.item_id for e in result.errors] == ["bad"]
    assert "400" in result.errors[0].message and "unsupported content" in result.errors[0].message
    assert result.ok.sum() == 9 and emb.stats["splits"] >= 3


def test_exhausted_retries_fail_only_that_batch(server):
    server.faults = [Fault("429")] * 5
    emb = make(server, batch_size=2, concurrency=1)
    result = emb.embed_many([Content.of(f"x{i}", item_id=str(i)) for i in range(4)], dim=128)
    assert [e.item_id for e in result.errors] == ["0", "1"]
    assert "gave up after 5 attempts" in result.errors[0].message and "429" in result.errors[0].message
    assert result.ok.tolist() == [False, False, True, True]


def test_limits_are_checked_before_sending(server, tmp_path):
    emb = make(server)
    seven = Content(tuple(Part("image", data=png(), mime_type="image/png") for _ in range(7)), item_id="seven")
    webp = Content((Part("image", data=b"RIFF....WEBP", mime_type="image/webp"),), item_id="webp")
    result = emb.embed_many([seven, webp, Content.of("ok", item_id="ok")], dim=128)
    assert {e.item_id: e.message for e in result.errors}.keys() == {"seven", "webp"}
    assert "7 images" in result.errors[0].message and "image/webp" in result.errors[1].message
    assert sum(r["n"] for r in server.requests) == 1  # only the good item was sent


def test_concurrency_is_bounded(server):
    server.faults = [Fault("slow", delay_s=0.3) for _ in range(8)]
    emb = make(server, batch_size=1, concurrency=2)
    emb.embed([Content.of(f"c{i}") for i in range(8)], dim=128)
    assert server.max_in_flight <= 2


def test_api_key_from_environment_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="GEMINI_API_KEY"):
        GeminiEmbedder(base_url=server.url)
    monkeypatch.setenv("GEMINI_API_KEY", server.api_key)
    emb = GeminiEmbedder(base_url=server.url, cache_dir=tmp_path)
    a = emb.embed([Content.of("cached thing")], dim=256)
    sent = len(server.requests)
    again = emb.embed_many([Content.of("cached thing")], dim=256)
    assert len(server.requests) == sent and again.cache_hits == 1
    assert np.allclose(a, again.vectors, atol=1e-6)


def noise_png(seed: int, size: int = 96, marker: bytes = b"") -> bytes:
    """A PNG that does not compress (tens of KB); ``marker`` rides in a text chunk (the server's poison)."""
    from PIL import PngImagePlugin

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    if marker:
        info.add_text("note", marker.decode())
    b = io.BytesIO()
    img.save(b, format="PNG", pnginfo=info)
    return b.getvalue()


def test_large_media_go_through_the_files_api(server):
    """Parts over ``upload_above`` are uploaded once (resumable upload through the real client) and sent by
    URI; the vectors equal those of the same bytes sent inline; requests stay small."""
    big = [noise_png(s) for s in range(3)]
    contents = [Content.of(f"poster {i}", Part("image", data=b, mime_type="image/png"), item_id=str(i))
                for i, b in enumerate(big)]
    contents.append(Content.of("same poster again", Part("image", data=big[0], mime_type="image/png"), item_id="dup"))
    contents.append(Content.of("small", Part("image", data=png(), mime_type="image/png"), item_id="small"))
    server.upload_faults = [Fault("503")]  # the first upload start is retried
    emb = make(server, upload_above=10_000)
    v = emb.embed(contents, dim=256)
    assert emb.stats["uploads"] == 3 and len(server.files) == 3  # the duplicate is not uploaded twice
    assert all(f["state"] == "ACTIVE" for f in server.files.values())
    for i in range(3):
        exp = server.expected([("text", f"title: none | text: poster {i}".encode()), ("image/png", big[i])], 256)
        assert np.allclose(v[i], exp, atol=1e-5)
    assert np.allclose(v[4], server.expected([("text", b"title: none | text: small"), ("image/png", png())], 256), atol=1e-5)
    assert max(r["bytes"] for r in server.requests) < min(len(b) for b in big)  # uploaded bytes never inlined


def test_a_file_the_service_cannot_process_fails_only_its_item(server):
    bad = noise_png(7, marker=b"POISON")
    contents = [Content.of("fine", Part("image", data=noise_png(8), mime_type="image/png"), item_id="ok"),
                Content.of("broken", Part("image", data=bad, mime_type="image/png"), item_id="bad"),
                Content.of("text only", item_id="t")]
    result = make(server, upload_above=10_000).embed_many(contents, dim=128)
    assert [e.item_id for e in result.errors] == ["bad"]
    assert "Files API could not process the image/png part" in result.errors[0].message
    assert result.ok.tolist() == [True, False, True]


def test_an_uploaded_video_is_waited_on_until_active(server, microlens):
    clip = (microlens / "videos" / "1002.mp4").read_bytes()
    emb = make(server, upload_above=10_000, file_poll_s=0.05)
    v = emb.embed([Content.of("a clip", Part("video", data=clip, mime_type="video/mp4"), item_id="v")], dim=128)
    (f,) = server.files.values()
    assert f["state"] == "ACTIVE" and f["polls"] < 0  # it was PROCESSING first; the client polled files.get
    assert np.allclose(v[0], server.expected([("text", b"title: none | text: a clip"), ("video/mp4", clip)], 128), atol=1e-5)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_request_budget_caps_in_flight_and_contents_per_minute():
    from recsys.embed.budget import RequestBudget

    clock = FakeClock()
    b = RequestBudget(concurrency=2, per_minute=100, clock=clock)
    assert b.try_acquire(40) == 0.0 and b.try_acquire(40) == 0.0
    assert b.try_acquire(10) > 0  # two in flight: the third waits
    b.release()
    clock.t += 10
    wait = b.try_acquire(40)  # 80 sent in this minute: 40 more would pass 100
    assert wait == pytest.approx(50.0)  # the first grant leaves the window at t0 + 60
    assert b.try_acquire(20) == 0.0  # 100 exactly fits
    b.release()
    clock.t += 50
    assert b.try_acquire(40) == 0.0  # the first 40 have left the window
    assert b.snapshot()["max_in_flight"] == 2 and b.snapshot()["contents"] == 140


def test_request_budget_pause_holds_every_caller_and_oversized_batches_still_go():
    from recsys.embed.budget import RequestBudget

    clock = FakeClock()
    b = RequestBudget(concurrency=4, per_minute=10, clock=clock)
    b.pause(5.0)
    assert b.try_acquire(1) == pytest.approx(5.0)
    clock.t += 5
    assert b.try_acquire(50) == 0.0  # larger than the whole budget: sent alone, counted as the whole minute
    assert b.try_acquire(1) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="concurrency"):
        RequestBudget(concurrency=0)


def test_a_429_pauses_the_shared_budget_for_every_thread(server):
    from recsys.embed.budget import LocalBudget

    class Recorded(LocalBudget):
        """Logs, under the budget's own lock, when each grant and the pause happened."""

        def __init__(self, concurrency: int):
            super().__init__(concurrency)
            self.grants: list[float] = []
            self.paused_at: list[float] = []

        def try_acquire(self, cost: int) -> float:
            with self._lock:
                wait = self.core.try_acquire(cost)
                if wait == 0.0:
                    self.grants.append(self.core.clock())
                return wait

        def pause(self, seconds: float) -> None:
            with self._lock:
                self.paused_at.append(self.core.clock())
                self.core.pause(seconds)

    budget = Recorded(concurrency=4)
    server.faults = [Fault("429", retry_after=0.4)]
    emb = make(server, batch_size=1, concurrency=4, budget=budget)
    emb.embed([Content.of(f"c{i}") for i in range(8)], dim=128)
    assert budget.snapshot()["pauses"] == 1 and len(server.requests) == 9  # 8 contents, one sent twice
    # once the 429 paused the budget, no thread was granted a request before Retry-After ran out (a thread
    # whose request was granted before the 429 came back may still send it: that is not a grant after it)
    (paused_at,) = budget.paused_at
    during = [t - paused_at for t in budget.grants if paused_at <= t < paused_at + 0.4]
    assert during == [], during
    assert any(t >= paused_at + 0.4 for t in budget.grants)  # the retry and the rest went after the pause
