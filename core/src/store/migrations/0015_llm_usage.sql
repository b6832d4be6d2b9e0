-- The LLM gateway's day counts per user (`llm usage`, the tokens-per-day
-- limit): requests and tokens, as the backends' answers report them. Days
-- are UTC dates ('2026-12-03').
CREATE TABLE llm_usage (
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day       TEXT NOT NULL,
    requests  INTEGER NOT NULL DEFAULT 0,
    tokens    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
