// `req` is the invoke payload (parsed JSON) or, for HTTP triggers, an API Gateway v2 event.
let calls = 0;

export default async (req) => {
  calls += 1;
  const http = req?.requestContext?.http;
  if (http) {
    const url = new URL(`https://${req.headers?.host ?? "localhost"}${req.rawPath}?${req.rawQueryString ?? ""}`);
    const name = url.searchParams.get("name") ?? "world";
    console.log(`${http.method} ${req.rawPath} name=${name}`);
    return {
      statusCode: 200,
      headers: { "content-type": "text/plain", "x-calls": String(calls) },
      body: `${env.GREETING}, ${name}! (${http.method} ${req.rawPath})`,
    };
  }
  const name = req?.name ?? "world";
  console.log(`invoked with name=${name}`);
  return { message: `${env.GREETING}, ${name}!`, calls };
};
