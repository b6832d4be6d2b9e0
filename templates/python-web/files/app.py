"""A web server from the standard library: `python3 app.py`, then open the project's URL."""
from http.server import BaseHTTPRequestHandler, HTTPServer
import os


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.end_headers()
        self.wfile.write(b"Hello from your Kennel VM!\n")


if __name__ == "__main__":
    HTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8000"))), Hello).serve_forever()
