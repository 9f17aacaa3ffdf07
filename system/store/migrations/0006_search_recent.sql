-- Search ranks the newest matches of a tenant, not all of them.
--
-- A word that most messages contain matched every row of the tenant, and ranking them all
-- (a parallel scan of the whole table, ts_rank per row) took 0.66 s and three backends per
-- query on 175,000 messages: at two searches a second one was always running.
-- `queries::search` now takes the newest matches first (at most a fixed number) and ranks
-- those; this index lets a common word be found walking back from the newest message,
-- while a rare one still goes through the GIN index.
CREATE INDEX IF NOT EXISTS search_messages_recent ON search_messages (tenant, created_at_ms);
