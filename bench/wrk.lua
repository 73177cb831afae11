-- wrk script for the REST cases: a bearer token, an optional JSON body, and a summary line.
-- Environment: WRK_METHOD (GET/POST), WRK_TOKEN, WRK_BODY (may contain {{n}}, replaced by a
-- value unique per request, for request_ids), WRK_RUN (unique per run).
local method = os.getenv("WRK_METHOD") or "GET"
local token = os.getenv("WRK_TOKEN") or ""
local body_template = os.getenv("WRK_BODY")
local run = os.getenv("WRK_RUN") or "run"
local counter = 0
local thread_no = 0

local threads = {}
setup = function(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads)
end

request = function()
  counter = counter + 1
  local body = nil
  local headers = {["Authorization"] = "Bearer " .. token}
  if body_template then
    body = (string.gsub(body_template, "{{n}}", run .. "-" .. thread_no .. "-" .. counter))
    headers["Content-Type"] = "application/json"
  end
  return wrk.format(method, nil, headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
