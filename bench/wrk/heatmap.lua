-- Heatmap-cache hits: originals already analysed, each request a size (aspect) not asked
-- before, so the sidecar runs the window search on the cached heatmap and nothing else.
-- Env: HEATCROP_BENCH_PATHS (originals), HEATCROP_BENCH_HEIGHT (a prime in 1000..2000).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local paths = common.read_paths()
local height = tonumber(os.getenv("HEATCROP_BENCH_HEIGHT") or "1009")
local i = 0
counts = {}

setup = common.setup
done = common.done

function request()
   local path = common.nth_path(paths, height, i)
   i = i + 1
   return wrk.format("GET", path)
end

function response(status, headers, body)
   common.count(status, headers)
end
