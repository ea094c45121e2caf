-- pgfanout schema, version 1: the outbox, pgfanout.publish() and pgfanout.track_table().
-- Applied by `pgfanout migrate` (and at start) inside one transaction, under an advisory
-- lock, after `pgfanout.schema_version` says version 1 is not there yet.

CREATE TABLE pgfanout.settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Largest event pgfanout.publish() accepts (bytes of its JSON text).
    max_event_bytes integer NOT NULL DEFAULT 1048576 CHECK (max_event_bytes > 0)
);
INSERT INTO pgfanout.settings DEFAULT VALUES;

CREATE SEQUENCE pgfanout.outbox_id_seq AS bigint;

-- One row is one event; its id is the bus idempotency key. Partitioned by a hash of the
-- channel, so one channel's events stay in one partition (in id order), and nodes can
-- work on different partitions at once.
CREATE TABLE pgfanout.outbox (
    id bigint NOT NULL DEFAULT nextval('pgfanout.outbox_id_seq'),
    part smallint NOT NULL,
    channel text NOT NULL,
    data jsonb NOT NULL,
    -- Row-change events get "commit_time" set when they are published.
    stamp_commit boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (part, id)
) PARTITION BY LIST (part);

DO $$
BEGIN
    FOR p IN 0..15 LOOP
        EXECUTE format('CREATE TABLE pgfanout.outbox_%s PARTITION OF pgfanout.outbox FOR VALUES IN (%s)', p, p);
    END LOOP;
END
$$;

CREATE FUNCTION pgfanout.partition_of(channel text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (abs(hashtext(channel)::bigint) % 16)::smallint
$$;

-- Writes one event in the caller's transaction; the transaction sends one wake-up
-- notification however many events it writes (Postgres folds identical notifications of
-- a transaction).
CREATE FUNCTION pgfanout.enqueue(channel text, data jsonb, stamp_commit boolean) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    size integer;
    max_size integer;
    new_id bigint;
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'pgfanout.publish: the channel must not be empty'
            USING ERRCODE = '22023';
    END IF;
    data := coalesce(data, 'null'::jsonb);
    size := octet_length(data::text);
    SELECT s.max_event_bytes INTO max_size FROM pgfanout.settings s;
    IF size > max_size THEN
        RAISE EXCEPTION 'pgfanout.publish: event of % bytes on channel "%" is over the limit of % bytes', size, channel, max_size
            USING ERRCODE = '54000',
                  HINT = 'Raise PGFANOUT_OUTBOX_MAX_EVENT_BYTES (pgfanout.settings.max_event_bytes), or publish a reference to the data instead.';
    END IF;
    INSERT INTO pgfanout.outbox (part, channel, data, stamp_commit)
    VALUES (pgfanout.partition_of(channel), channel, data, stamp_commit)
    RETURNING id INTO new_id;
    PERFORM pg_notify('pgfanout_outbox', '');
    RETURN new_id;
END
$$;

CREATE FUNCTION pgfanout.publish(channel text, data jsonb) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgfanout.enqueue(channel, data, false)
$$;

-- Row-change trigger: TG_ARGV[0] the channel, TG_ARGV[1] the primary-key columns (JSON array).
CREATE FUNCTION pgfanout.track_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload jsonb;
    row_json jsonb;
    key_columns text[];
BEGIN
    payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME);
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        row_json := to_jsonb(NEW);
        payload := payload || jsonb_build_object('new', row_json);
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        payload := payload || jsonb_build_object('old', to_jsonb(OLD));
        IF TG_OP = 'DELETE' THEN
            row_json := to_jsonb(OLD);
        END IF;
    END IF;
    SELECT array_agg(c) INTO key_columns FROM jsonb_array_elements_text(TG_ARGV[1]::jsonb) AS c;
    IF key_columns IS NOT NULL THEN
        payload := payload || jsonb_build_object('key',
            (SELECT jsonb_object_agg(k, row_json -> k) FROM unnest(key_columns) AS k));
    END IF;
    PERFORM pgfanout.enqueue(TG_ARGV[0], payload, true);
    RETURN NULL;
END
$$;

-- Publishes every insert, update and delete of `target` on `channel` (default: the table's
-- name); returns the channel. Calling it again replaces the trigger.
CREATE FUNCTION pgfanout.track_table(target regclass, channel text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    ch text;
    keys jsonb;
BEGIN
    SELECT coalesce(channel, c.relname) INTO ch FROM pg_class c WHERE c.oid = target;
    SELECT coalesce(jsonb_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum)), '[]'::jsonb)
      INTO keys
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = target AND i.indisprimary;
    EXECUTE format('DROP TRIGGER IF EXISTS pgfanout_track ON %s', target);
    EXECUTE format(
        'CREATE TRIGGER pgfanout_track AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION pgfanout.track_trigger(%L, %L)',
        target, ch, keys::text);
    RETURN ch;
END
$$;

-- Stops tracking `target`.
CREATE FUNCTION pgfanout.untrack_table(target regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS pgfanout_track ON %s', target);
END
$$;
