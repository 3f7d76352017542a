"""The HTTP reward client against a real reward server on loopback, started by each test."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import RemoteReward, RewardError, load_reward


class RewardServer:
    """OpenRLHF-style reward server: reward 1 when a query ends with its label.

    fail_first: the first n requests answer `status`; slow_first: the first n requests sleep
    `sleep` seconds first; die_after: after that many answered requests the server drops the
    connection it is on and stops listening.
    """

    def __init__(self, fail_first=0, status=500, slow_first=0, sleep=0.0, die_after=None, answer=None):
        self.fail_first, self.status, self.slow_first, self.sleep = fail_first, status, slow_first, sleep
        self.die_after, self.answer = die_after, answer
        self.times, self.bodies, self.lock = [], [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                with server.lock:
                    n = len(server.times)
                    server.times.append(time.monotonic())
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                if server.die_after is not None and n >= server.die_after:
                    # Stop listening before dropping this connection, so every retry is refused.
                    server.close()
                    self.close_connection = True
                    return  # no response at all: the client sees the connection drop
                if n < server.slow_first:
                    time.sleep(server.sleep)
                if n < server.fail_first:
                    return self.reply(server.status, {"error": "try again"})
                rewards = [
                    float(q.endswith(str(label))) for q, label in zip(body["query"], body["labels"], strict=True)
                ]
                self.reply(200, server.answer if server.answer is not None else {"rewards": rewards})

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client that timed out has gone; that is what the test wanted

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/get_reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.closed = False

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve():
    servers = []

    def start(**behaviour):
        servers.append(RewardServer(**behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


PROMPTS = ["Q: 3 + 4? A: ", "Q: 2 + 2? A: ", "Q: 5 - 1? A: ", "Q: 1 + 1? A: "]
COLUMNS = {"answer": ["7", "4", "4", "2"]}
COMPLETIONS = [["7", "5", "4", "2"], ["6", "4", "3", "2"]]
EXPECTED = [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]


def test_rewards_arrive_in_batches_in_openrlhf_format(serve):
    server = serve()
    reward = RemoteReward(server.url, batch_size=3, max_concurrency=2)
    result = reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert result.matrix.tolist() == EXPECTED and result.valid.all()
    assert list(result.per_reward) == ["remote"]
    assert sorted(len(b["query"]) for b in server.bodies) == [2, 3, 3]
    first = next(b for b in server.bodies if b["prompts"][0] == PROMPTS[0] and len(b["query"]) == 3)
    assert first == {"query": [p + c for p, c in zip(PROMPTS[:3], COMPLETIONS[0][:3], strict=True)],
                     "prompts": PROMPTS[:3], "labels": ["7", "4", "4"]}  # fmt: skip


def test_rate_limit_holds_at_the_server(serve):
    server = serve()
    period, limit = 0.3, 2
    reward = RemoteReward(server.url, batch_size=1, max_concurrency=8, rate_limit=limit, period=period)
    started = time.monotonic()
    result = reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert result.matrix.tolist() == EXPECTED
    times = sorted(server.times)
    assert len(times) == 8
    # Any `limit + 1` consecutive arrivals span at least one period (less a little network jitter).
    gaps = [times[k + limit] - times[k] for k in range(len(times) - limit)]
    assert min(gaps) >= period - 0.08, gaps
    assert time.monotonic() - started >= 3 * period - 0.08
    # The limiter persists across calls: a second step cannot burst right after the first.
    reward.score(PROMPTS[:1], [["7"]], {"answer": ["7"]})
    times = sorted(server.times)
    assert times[-1] - times[-1 - limit] >= period - 0.08


def test_retries_with_exponential_backoff_then_success(serve):
    server = serve(fail_first=2)
    reward = RemoteReward(server.url, batch_size=8, retries=2, backoff=0.1, jitter=0.0)
    result = reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert result.matrix.tolist() == EXPECTED
    t = server.times
    assert len(t) == 3
    assert t[1] - t[0] >= 0.1 and t[2] - t[1] >= 0.2


def test_retries_exhausted_raise(serve):
    server = serve(fail_first=10, status=503)
    reward = RemoteReward(server.url, name="judge", batch_size=8, retries=1, backoff=0.01)
    with pytest.raises(RewardError) as info:
        reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert len(server.times) == 2
    assert info.value.reward == "judge" and (info.value.member, info.value.sample) == (0, 0)
    assert "failed after 2 attempts" in str(info.value) and "HTTP 503" in str(info.value)


def test_client_errors_are_not_retried(serve):
    server = serve(fail_first=10, status=400)
    with pytest.raises(RewardError, match="HTTP 400"):
        RemoteReward(server.url, retries=3, backoff=0.01).score(PROMPTS, COMPLETIONS, COLUMNS)
    assert len(server.times) == 1


def test_timeout_then_retry_succeeds(serve):
    server = serve(slow_first=1, sleep=1.0)
    started = time.monotonic()
    reward = RemoteReward(server.url, batch_size=8, timeout=0.2, retries=1, backoff=0.01)
    assert reward.score(PROMPTS, COMPLETIONS, COLUMNS).matrix.tolist() == EXPECTED
    assert len(server.times) == 2 and time.monotonic() - started < 0.9


def test_timeouts_exhausted_raise(serve):
    server = serve(slow_first=10, sleep=1.0)
    started = time.monotonic()
    reward = RemoteReward(server.url, batch_size=8, timeout=0.15, retries=1, backoff=0.01)
    with pytest.raises(RewardError, match="failed after 2 attempts.*Timeout"):
        reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert len(server.times) == 2 and time.monotonic() - started < 0.9


def test_server_dying_mid_scoring_fails_the_call(serve):
    server = serve(die_after=2)
    reward = RemoteReward(server.url, batch_size=1, max_concurrency=1, retries=2, backoff=0.01, timeout=5.0)
    weights = [0.0]
    with pytest.raises(RewardError, match="failed after 3 attempts"):
        result = reward.score(PROMPTS, COMPLETIONS, COLUMNS)
        weights[0] += result.matrix.sum().item()  # what a trainer would do next: never reached
    assert weights == [0.0]
    assert len(server.times) == 3 and server.closed


def test_malformed_answers_fail_at_once(serve):
    server = serve(answer={"scores": [1.0]})
    with pytest.raises(RewardError, match="expected a JSON object with a 'rewards' list"):
        RemoteReward(server.url, retries=3).score(PROMPTS, COMPLETIONS, COLUMNS)
    server = serve(answer={"rewards": [1.0]})
    with pytest.raises(RewardError, match="returned 1 rewards for 8 queries"):
        RemoteReward(server.url, retries=3).score(PROMPTS, COMPLETIONS, COLUMNS)
    server = serve(answer={"rewards": [None, 1.0, float("nan"), 1, 1, 1, 1, 1]})
    with pytest.raises(RewardError) as info:
        RemoteReward(server.url).score(PROMPTS, COMPLETIONS, COLUMNS)
    assert (info.value.member, info.value.sample) == (0, 2) and "finite" in str(info.value)


def test_remote_reward_combines_with_local_ones(serve):
    server = serve()
    reward = load_reward([server.url, "numeric"], weights=[1.0, 2.0])
    result = reward.score(PROMPTS, COMPLETIONS, COLUMNS)
    assert set(result.per_reward) == {"remote", "numeric"}
    assert result.matrix.tolist() == [[3 * x for x in row] for row in EXPECTED]
