-- wrk script: POST pre-signed, unique deliveries read line by line from BODIES_FILE.
-- Each line is "<signature> <json body>". When the file runs out it starts over (those repeats
-- are counted by the benchmark as duplicates).
-- RATE (requests per second over all connections, CONNECTIONS of them) paces the load: each
-- connection waits a random, exponentially distributed time before each request, so arrivals
-- are spread as independent clients' are. Without RATE every connection sends as fast as it is
-- answered.
local path = os.getenv("BODIES_FILE")
local rate = tonumber(os.getenv("RATE") or "")
local connections = tonumber(os.getenv("CONNECTIONS") or "32")
local file = nil

local function next_line()
  if file == nil then file = assert(io.open(path, "r")) end
  local line = file:read("*l")
  if line == nil then
    file:close()
    file = assert(io.open(path, "r"))
    line = file:read("*l")
  end
  return line
end

if rate ~= nil then
  local mean_ms = connections * 1000 / rate
  delay = function()
    return math.floor(-math.log(1 - math.random()) * mean_ms + 0.5)
  end
end

request = function()
  local line = next_line()
  local space = line:find(" ", 1, true)
  local signature = line:sub(1, space - 1)
  local body = line:sub(space + 1)
  return wrk.format("POST", "/webhooks/smartcar",
    { ["Content-Type"] = "application/json", ["SC-Signature"] = signature }, body)
end

done = function(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"duration_us\": %d, \"non2xx\": %d, \"p50_us\": %d, \"p99_us\": %d, \"errors\": %d}\n",
    summary.requests, summary.duration, summary.errors.status, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
