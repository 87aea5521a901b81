"""`trtglm serve` with the official `openai` client on the loopback interface: completions and chat, streaming
and not, concurrent requests against `trtglm run` alone, the error answers, cancellation, and a bounded soak."""

import json
import os
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from trtglm.engine.build import build
from trtglm.export.exporter import export
from trtglm.model.tokenizer import load_text
from trtglm.runtime.backends import OrtBackend
from trtglm.runtime.generate import generate

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-glm4"
PROMPTS = ["In the beginning", "And the king said unto", "The", "Then came the word of the Lord to the prophet, saying",
           "And it came to pass", "Blessed are", "For God so loved", "Now the serpent was more subtil than any beast"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The shipped model, fp32, with a dynamic and a static KV cache (ONNX Runtime)."""
    root = tmp_path_factory.mktemp("serve")
    export(str(MODEL), root / "e", dtype="fp32", validate=False, max_seq_len=256)
    for kv_cache in ("dynamic", "static"):
        build(root / "e", root / kv_cache, onnx_only=True, overrides={"shapes": {"kv_cache": kv_cache}})
    return {k: root / k for k in ("dynamic", "static")}


@contextmanager
def serving(build_dir, *flags, env=None):
    """`trtglm serve BUILD --port 0 --json ...` in a process of its own: (url, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "trtglm", "serve", str(build_dir), "--port", "0", "--json", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            pytest.fail(f"trtglm serve did not start: {proc.stderr.read()}")
        yield json.loads(line)["url"], proc
        proc.terminate()  # SIGTERM: a graceful stop, exit 0
        assert proc.wait(timeout=20) == 0 and "trtglm serve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=120, **kw)


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.status, r.read().decode()


def post(url, path, body: bytes, headers=None):
    request = urllib.request.Request(url + path, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def metric(url, name) -> float:
    text = get(url, "/metrics")[1]
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def server(builds):
    with serving(builds["dynamic"], "--max-batch", "4", "--model-name", "tiny", "--prefix-cache-mb", "1") as (url, proc):
        yield url, proc


def alone(build_dir, prompt: str, max_tokens: int) -> str:
    """`trtglm run` of one prompt by itself, greedy: its text."""
    text = load_text(build_dir)
    out = generate(OrtBackend.from_build(build_dir), [text.encode(prompt)], max_new_tokens=max_tokens,
                   stop_ids=text.stop_ids, pad_id=text.pad_id)
    return text.decode(out.tokens[0]), len(out.tokens[0])


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_concurrent_greedy_requests_get_what_each_prompt_gets_alone(builds, kv_cache):
    """Eight prompts of other lengths, streamed and not, through four rows: each gets `trtglm run`'s tokens."""
    lengths = [24, 5, 40, 12, 30, 8, 17, 3]
    with serving(builds[kv_cache], "--max-batch", "4", "--model-name", "tiny") as (url, _):
        c = client(url)

        def ask(i):
            if i % 2:
                stream = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                              stream=True, stream_options={"include_usage": True})
                chunks = list(stream)
                return "".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].usage.completion_tokens
            r = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(8)))
        assert metric(url, "trtglm_time_to_first_token_seconds_count") == 8
    assert got == [alone(builds[kv_cache], p, n) for p, n in zip(PROMPTS, lengths)]


def test_chat_streamed_and_whole_agree(server, builds):
    url, _ = server
    c = client(url)
    messages = [{"role": "system", "content": "You are a scribe."}, {"role": "user", "content": "Who was David?"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    text = load_text(builds["dynamic"])
    ids = text.chat(messages)
    assert whole.usage.prompt_tokens == len(ids)
    out = generate(OrtBackend.from_build(builds["dynamic"]), [ids], max_new_tokens=20, stop_ids=text.stop_ids)
    assert whole.choices[0].message.content == text.decode(out.tokens[0])


def test_sampling_stop_strings_and_several_choices(server):
    url, _ = server
    c = client(url)
    seeded = dict(model="tiny", prompt="And the king", max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    a = c.completions.create(**seeded, n=2)
    b = c.completions.create(**seeded, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2
    assert c.completions.create(**seeded).choices[0].text == a.choices[0].text  # seed, then seed+1 for the next
    free = c.completions.create(model="tiny", prompt="And the king", max_tokens=24, temperature=0).choices[0].text
    word = free.split()[3]
    cut = c.completions.create(model="tiny", prompt="And the king", max_tokens=24, temperature=0, stop=[word])
    assert cut.choices[0].text == free[:free.index(word)] and cut.choices[0].finish_reason == "stop"
    many = c.completions.create(model="tiny", prompt=[[101], [101, 102, 103]], max_tokens=4, temperature=0)
    assert [x.index for x in many.choices] == [0, 1] and many.usage.prompt_tokens == 1 + 3
    long = c.completions.create(model="tiny", prompt="The", max_tokens=100000, temperature=0, extra_body={
        "ignore_eos": True})
    assert long.usage.completion_tokens == 256 - 1 and long.choices[0].finish_reason == "length"


def test_models_health_and_metrics(server):
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    status, body = get(url, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    before = metric(url, "trtglm_generated_tokens_total")
    client(url).completions.create(model="tiny", prompt="The", max_tokens=5, temperature=0, extra_body={
        "ignore_eos": True})
    text = get(url, "/metrics")[1]
    assert metric(url, "trtglm_generated_tokens_total") == before + 5
    for name in ("trtglm_time_per_output_token_seconds_bucket", "trtglm_queue_depth", "trtglm_running_batch_size",
                 "trtglm_output_tokens_per_second", 'trtglm_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in text


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    url, _ = server
    c = client(url)
    cases = [
        (dict(model="tiny", prompt="x " * 400, max_tokens=4), "leaves no room in the engine's max_seq_len 256"),
        (dict(model="gpt-4", prompt="x"), "model 'gpt-4' is not served here"),
        (dict(model="tiny", prompt="x", temperature=3), "temperature: Input should be less than or equal to 2"),
        (dict(model="tiny", prompt="x", top_p=0), "top_p: Input should be greater than 0"),
        (dict(model="tiny", prompt="x", max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (dict(model="tiny", prompt=[], max_tokens=2), "prompt"),
        (dict(model="tiny", prompt=[10**9]), "past the model's vocabulary"),
        (dict(model="tiny", prompt="x", logprobs=2), "logprobs is not supported"),
        (dict(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"]), "up to 4 stop strings"),
    ]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            c.completions.create(**kwargs)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="tiny", messages=[])
    status, _, body = post(url, "/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and "malformed JSON" in json.loads(body)["error"]["message"]
    status, _, body = post(url, "/v1/completions", b'[1, 2]')
    assert status == 400 and json.loads(body)["error"]["message"]
    status, _, body = post(url, "/v1/nothing", b'{}')
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    assert c.completions.create(model="tiny", prompt="The", max_tokens=3).usage.completion_tokens >= 1
    assert metric(url, 'trtglm_requests_total{endpoint="/v1/completions",status="400"}') >= len(cases)


def test_a_client_that_goes_away_cancels_its_row(server):
    url, _ = server
    c = client(url)
    before = metric(url, "trtglm_cancelled_requests_total")
    stream = c.completions.create(model="tiny", prompt="The", max_tokens=250, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline and json.loads(get(url, "/health")[1])["running"]:
        time.sleep(0.05)
    assert json.loads(get(url, "/health")[1])["running"] == 0
    assert metric(url, "trtglm_cancelled_requests_total") == before + 1
    generated = metric(url, "trtglm_generated_tokens_total")
    time.sleep(0.3)
    assert metric(url, "trtglm_generated_tokens_total") == generated  # nothing runs for it any more


def test_a_full_queue_answers_429_and_an_api_key_is_required(builds):
    with serving(builds["dynamic"], "--max-batch", "1", "--max-queue", "1", "--model-name", "tiny",
                 env={"TRTGLM_API_KEY": "sesame"}) as (url, _):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url).models.list()
        assert e.value.status_code == 401
        with pytest.raises(openai.AuthenticationError, match="not valid"):
            client(url, api_key="wrong").completions.create(model="tiny", prompt="x")
        c = client(url, api_key="sesame")
        long = dict(model="tiny", prompt="The", max_tokens=250, temperature=0, extra_body={"ignore_eos": True})

        def ask(_):
            try:
                return c.completions.create(**long).usage.completion_tokens
            except openai.RateLimitError as e:
                return e

        with ThreadPoolExecutor(4) as pool:  # one row, one place in the queue: two of four at once are refused
            answers = list(pool.map(ask, range(4)))
        refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
        assert refused and all(a == 250 for a in answers if not isinstance(a, Exception))
        assert int(refused[0].response.headers["retry-after"]) >= 1 and refused[0].body["code"] == "queue_full"
        assert c.completions.create(**long).usage.completion_tokens == 250
        assert get(url, "/health")[0] == 200  # /health and /metrics need no key


def test_soak(server):
    """A few hundred requests from a few clients: every one answered, the server's memory flat."""
    url, proc = server

    def rss_mb():
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024

    def burst(n, seed):
        c = client(url)

        def one(i):
            kw = dict(model="tiny", max_tokens=4 + i % 9, temperature=0.8, seed=seed + i)
            if i % 3:
                return c.completions.create(prompt=PROMPTS[i % 8] + f" {i}", **kw).usage.completion_tokens
            r = c.chat.completions.create(messages=[{"role": "user", "content": f"Tell me about {i}"}], stream=True,
                                          **kw)
            return sum(1 for ch in r if ch.choices and ch.choices[0].delta.content is not None) >= 0

        with ThreadPoolExecutor(6) as pool:
            return list(pool.map(one, range(n)))

    assert all(burst(100, 0))  # warm: allocator arenas, the prefix cache up to its bound
    start = rss_mb()
    answers = burst(400, 1000)
    assert len(answers) == 400 and all(answers)
    grown = rss_mb() - start
    assert grown < 25, f"the server grew {grown:.1f} MB over 400 requests"
    assert get(url, "/health")[0] == 200


def test_a_failed_step_ends_its_rows_and_the_loop_goes_on(builds):
    """A backend error in one step: the requests in it hear the reason, later requests are served."""
    from trtglm.runtime.sampling import Sampling
    from trtglm.serve.scheduler import Request, Scheduler

    class Flaky:
        def __init__(self, backend):
            self.backend, self.fail = backend, 1

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def forward(self, *args):
            if self.fail:
                self.fail -= 1
                raise RuntimeError("device lost\nmore detail")
            return self.backend.forward(*args)

    scheduler = Scheduler(Flaky(OrtBackend.from_build(builds["dynamic"])))
    scheduler.start()
    heard = {0: [], 1: []}
    done = threading.Event()

    def listener(k):
        def hear(token, finish):
            heard[k].append((token, finish))
            if k == 1 and finish:
                done.set()
        return hear

    scheduler.submit([Request([5, 6, 7], 4, Sampling(), frozenset(), listener(0))])
    time.sleep(0.5)
    scheduler.submit([Request([5, 6, 7], 4, Sampling(), frozenset(), listener(1))])
    assert done.wait(30)
    scheduler.stop()
    assert heard[0] == [(None, "error: RuntimeError: device lost")]
    assert [f for _, f in heard[1]] == [None, None, None, "length"] and scheduler.failure is None


def test_streamed_text_is_the_whole_decode_cut_at_the_first_stop_string():
    from trtglm.serve.text_stream import TextStream

    text = load_text(MODEL)
    rng = __import__("numpy").random.default_rng(3)
    vocab = len(text.tokenizer)
    for case in range(300):
        ids = rng.integers(0, vocab, rng.integers(1, 40)).tolist()
        if case % 3 == 0:  # byte-level pieces of multi-byte characters
            ids = text.encode("été – 你好 🙂 " * 3)[: rng.integers(1, 20)] + ids[:5]
        whole = text.decode(ids)
        i = int(rng.integers(0, max(1, len(whole) - 1)))
        stops = [whole[i:i + int(rng.integers(1, 4))].replace("\ufffd", "")] if case % 2 else []
        stream = TextStream(text.decode, stops)
        pieces = [stream.add(t) for t in ids] + [stream.finish()]
        hit = min((whole.find(s) for s in stops if s and whole.find(s) >= 0), default=-1)
        expect = whole[:hit] if hit >= 0 else whole
        assert "".join(pieces) == expect == stream.text, (ids, stops)
        assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in expect


def test_serve_refuses_what_cannot_work_in_one_line(builds, tmp_path):
    import shutil

    def serve(*args):
        r = subprocess.run([sys.executable, "-m", "trtglm", "serve", *args], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("trtglm: error: ") or
                  line.startswith("Error: ")]
        return r.returncode, errors[-1] if errors else r.stderr

    code, line = serve(str(builds["dynamic"]), "--host", "203.0.113.1", "--port", "0")
    assert code == 1 and line.startswith("trtglm: error: cannot listen on 203.0.113.1:0: Cannot assign requested")
    bare = tmp_path / "bare"
    shutil.copytree(builds["dynamic"], bare)
    (bare / "tokenizer.json").unlink()
    code, line = serve(str(bare))
    assert code == 1 and "no tokenizer.json" in line
    code, line = serve(str(builds["dynamic"]), "--max-batch", "0")
    assert code == 2 and "--max-batch" in line
    help_text = subprocess.run([sys.executable, "-m", "trtglm", "serve", "--help"], capture_output=True, text=True)
    for flag in ("--host", "--port", "--backend", "--max-batch", "--max-queue", "--api-key", "--json"):
        assert flag in help_text.stdout
