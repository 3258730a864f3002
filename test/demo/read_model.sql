-- The demo's "community" read model: one row per board with its title, body
-- and counters, fed by the events of topic community.boards (see
-- test/demo/write_model.sql and docs/read-side.md).  Needs CREATE EXTENSION
-- cqrs_sync in this database; shared_preload_libraries is not needed.
--
-- Events (Kafka value = JSON payload, header event_id = the outbox uuid):
--   BoardCreated, BoardUpdated  {"type", "board_id", "title", "body", "version"}
--   BoardDeleted                {"type", "board_id", "version"}
--   CommentAdded                {"type", "board_id", "comment_id", "author", "body"}
--   BoardLiked                  {"type", "board_id", "user"}

CREATE TABLE board_detail (
    board_id bigint PRIMARY KEY,
    title    text,                       -- NULL until BoardCreated arrived
    body     text,
    likes    bigint NOT NULL DEFAULT 0,
    comments bigint NOT NULL DEFAULT 0,
    version  bigint NOT NULL DEFAULT 0   -- 0: only counters seen so far
) WITH (fillfactor = 90);                -- room for HOT updates of the counters
COMMENT ON TABLE board_detail IS
    'Read model of the community demo: a board''s detail page, kept by community_apply().';

-- What the API reads: boards whose BoardCreated was applied.
CREATE VIEW board_page AS
    SELECT board_id, title, body, likes, comments, version
      FROM board_detail
     WHERE version > 0;
COMMENT ON VIEW board_page IS 'Boards of the community demo that exist (their BoardCreated was applied).';

-- The mapping of events to the read model: what each event changes.  Counter
-- events are deduplicated by cqrs_apply_delta() under the consumer; state
-- events are idempotent by version.  Returns true if it changed the model.
CREATE FUNCTION community_change(consumer text, event_id text, event jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    board jsonb := jsonb_build_object('board_id', event->'board_id');
BEGIN
    CASE event->>'type'
    WHEN 'BoardCreated', 'BoardUpdated' THEN
        -- the counters are not in the row: an upsert never resets them
        RETURN cqrs_upsert('board_detail',
                           jsonb_build_object('board_id', event->'board_id',
                                              'title', event->'title',
                                              'body', event->'body'),
                           (event->>'version')::bigint);
    WHEN 'BoardDeleted' THEN
        RETURN cqrs_delete('board_detail', board, (event->>'version')::bigint);
    WHEN 'CommentAdded' THEN
        RETURN cqrs_apply_delta('board_detail', board, '{"comments": 1}', consumer, event_id);
    WHEN 'BoardLiked' THEN
        RETURN cqrs_apply_delta('board_detail', board, '{"likes": 1}', consumer, event_id);
    ELSE
        RETURN false;   -- an event this read model does not use
    END CASE;
END
$$;
COMMENT ON FUNCTION community_change(text, text, jsonb) IS
    'The community read model''s mapping: what one event (BoardCreated, BoardUpdated, BoardDeleted, CommentAdded, BoardLiked) changes in board_detail; returns whether it changed it.';

-- Applies one event, exactly once per (consumer, event_id), in the caller's
-- transaction, for a consumer of your own.  Returns true if it changed the
-- read model.  Call it in the transaction that also commits the consumer's
-- progress, e.g.
--   BEGIN; SELECT community_apply('board-view', $event_id, $payload); COMMIT;
CREATE FUNCTION community_apply(consumer text, event_id text, event jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    -- counter events deduplicate themselves (cqrs_apply_delta's memory)
    IF event->>'type' NOT IN ('CommentAdded', 'BoardLiked')
       AND NOT cqrs_mark_processed(consumer, event_id) THEN
        RETURN false;                                   -- a redelivery
    END IF;
    RETURN community_change(consumer, event_id, event);
END
$$;
COMMENT ON FUNCTION community_apply(text, text, jsonb) IS
    'Applies one community event (BoardCreated, BoardUpdated, BoardDeleted, CommentAdded, BoardLiked) to board_detail exactly once per (consumer, event_id); returns whether it changed the read model.';

-- The sink's handler (docs/sink.md): the sink records each event in the inbox
-- and skips duplicates itself, in the transaction that stores its position.
CREATE FUNCTION community_sink(e cqrs_event)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM community_change('board-view', e.event_id, e.payload);
END
$$;
COMMENT ON FUNCTION community_sink(cqrs_event) IS
    'Handler of the demo''s sink board-view: applies one community event to board_detail.';
