-- The demo's "community" write model: boards, comments and likes.  Every
-- function changes the write model and enqueues its event in the same
-- transaction, keyed by board id so that one board's events stay in order.

CREATE TABLE boards (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title      text NOT NULL,
    body       text NOT NULL DEFAULT '',
    version    bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE comments (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    board_id   bigint NOT NULL REFERENCES boards,
    author     text NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE likes (
    board_id   bigint NOT NULL REFERENCES boards,
    user_name  text NOT NULL,
    PRIMARY KEY (board_id, user_name)
);

CREATE FUNCTION create_board(p_title text, p_body text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    b boards;
BEGIN
    INSERT INTO boards (title, body) VALUES (p_title, p_body) RETURNING * INTO b;
    PERFORM cqrs_enqueue('community.boards', b.id::text,
        jsonb_build_object('type', 'BoardCreated', 'board_id', b.id,
                           'title', b.title, 'body', b.body, 'version', b.version),
        jsonb_build_object('event-type', 'BoardCreated'));
    RETURN b.id;
END
$$;

CREATE FUNCTION update_board(p_board bigint, p_title text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    b boards;
BEGIN
    UPDATE boards SET title = p_title, version = version + 1
     WHERE id = p_board RETURNING * INTO b;
    IF FOUND THEN
        PERFORM cqrs_enqueue('community.boards', b.id::text,
            jsonb_build_object('type', 'BoardUpdated', 'board_id', b.id,
                               'title', b.title, 'body', b.body, 'version', b.version),
            jsonb_build_object('event-type', 'BoardUpdated'));
    END IF;
END
$$;

CREATE FUNCTION add_comment(p_board bigint, p_author text, p_body text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    c comments;
BEGIN
    INSERT INTO comments (board_id, author, body) VALUES (p_board, p_author, p_body)
    RETURNING * INTO c;
    PERFORM cqrs_enqueue('community.boards', p_board::text,
        jsonb_build_object('type', 'CommentAdded', 'board_id', p_board,
                           'comment_id', c.id, 'author', c.author, 'body', c.body),
        jsonb_build_object('event-type', 'CommentAdded'));
END
$$;

CREATE FUNCTION like_board(p_board bigint, p_user text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO likes VALUES (p_board, p_user) ON CONFLICT DO NOTHING;
    IF FOUND THEN
        PERFORM cqrs_enqueue('community.boards', p_board::text,
            jsonb_build_object('type', 'BoardLiked', 'board_id', p_board, 'user', p_user),
            jsonb_build_object('event-type', 'BoardLiked'));
    END IF;
END
$$;
