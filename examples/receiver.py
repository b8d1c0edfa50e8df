"""A receiver for Kobe's http tasks: checks the signature and its time, then answers.

    KOBE_TASK_SIGNING_SECRET=change-me-to-16-or-more python3 examples/receiver.py
"""
import hashlib
import hmac
import json
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["KOBE_TASK_SIGNING_SECRET"].encode()
# A signature older (or newer) than this is refused: keep the clocks in step.
MAX_AGE_S = 300


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        sent_at = self.headers.get("X-Kobe-Timestamp", "")
        expected = "sha256=" + hmac.new(SECRET, sent_at.encode() + b"." + body, hashlib.sha256).hexdigest()
        fresh = sent_at.isdigit() and abs(time.time() - int(sent_at)) <= MAX_AGE_S
        if not fresh or not hmac.compare_digest(expected, self.headers.get("X-Kobe-Signature", "")):
            # Forged, or a captured request replayed later. A 4xx other than 408/429: FAILURE, no retry.
            self.send_response(401)
            self.end_headers()
            return
        task = json.loads(body)
        print("task", task["task_id"], "attempt", task["attempt"], "kwargs", task["kwargs"])
        reply = json.dumps({"delivered_to": task["kwargs"]["to"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


HTTPServer(("127.0.0.1", 9000), Hook).serve_forever()
