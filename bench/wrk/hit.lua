-- Box-cache hits: the URL given to wrk, already warmed, over and over. No response()
-- callback, so wrk does not have to hand every header to Lua (the fastest client path).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

counts = {}
setup = common.setup
done = common.done
