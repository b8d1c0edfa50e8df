"""A command task: reads Kobe's invocation from stdin, prints its result as JSON on stdout."""
import json
import sys

invocation = json.load(sys.stdin)
text = invocation["kwargs"].get("text")
if not isinstance(text, str):
    print("kwargs.text must be a string", file=sys.stderr)
    sys.exit(2)  # FAILURE, no retry
print(json.dumps({"words": len(text.split())}))
