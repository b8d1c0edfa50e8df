-- wrk: POST a no-op task to /task/start.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("KOBE_BENCH_BODY") or '{"task_name": "noop", "kwargs": {}}'
