-- Every request a size (aspect) not asked before, over a list of originals: with originals
-- already analysed that is a heatmap-cache hit each time, with a cache too small to hold them
-- the cold path. Optionally paced per connection by delay() so that the offered rate does not
-- depend on how fast the sidecar answers (an open-ish loop).
-- Env: HEATCROP_BENCH_PATHS, HEATCROP_BENCH_HEIGHT, HEATCROP_BENCH_DELAY_MS (0: no pacing).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local paths = common.read_paths()
local height = tonumber(os.getenv("HEATCROP_BENCH_HEIGHT") or "1013")
local pause = tonumber(os.getenv("HEATCROP_BENCH_DELAY_MS") or "0")
local i = 0
counts = {}

setup = common.setup
done = common.done

function request()
   local path = common.nth_path(paths, height, i)
   i = i + 1
   return wrk.format("GET", path)
end

function delay()
   return pause
end

function response(status, headers, body)
   common.count(status, headers)
end
