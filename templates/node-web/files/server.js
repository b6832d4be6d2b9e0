// A web server with no dependencies: `npm start`, then open the project's URL.
const http = require("http");
const port = process.env.PORT || 3000;
http
  .createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("Hello from your Kennel VM!\n");
  })
  .listen(port, () => console.log(`listening on ${port}`));
