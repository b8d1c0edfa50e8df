"""A receiver for Kobe's http tasks: checks the signature, then answers.

    KOBE_TASK_SIGNING_SECRET=change-me-to-16-or-more python3 examples/receiver.py
"""
import hashlib
import hmac
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["KOBE_TASK_SIGNING_SECRET"].encode()


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.headers.get("X-Kobe-Signature", "")):
            self.send_response(401)  # a 4xx other than 408/429: FAILURE, no retry
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
