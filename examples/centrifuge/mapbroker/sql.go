package mapbroker

import (
	"github.com/jackc/pgx/v5"
)

// pgstore's change log, as this package reads it (see the package comment,
// "What this relies on").
const (
	logHead    = "pgstore/log"         // one row: log_id, position, dropped, active
	logEntries = "pgstore/log_entries" // position, off, tbl, op, id, version, val
	logOffsets = "pgstore/log_offsets" // tbl, off: a table's floor (see logEndSQL)
)

// logEndSQL and tableOffsetSQL are where the log ends and where a table's
// offsets end ($1 names the table), for a statement that reads the head as
// h: pgstore's writers count from the log's entries, under the head lock,
// above floors raised whenever the partition taking the appends changes (the
// head's position, the offsets table).
func logEndSQL(entries string) string {
	return "greatest(h.position, (SELECT le.position FROM " + entries + " le ORDER BY le.position DESC LIMIT 1))"
}

func tableOffsetSQL(entries, offsets string) string {
	return "coalesce(greatest((SELECT o.off FROM " + offsets + " o WHERE o.tbl = $1), " +
		"(SELECT le.off FROM " + entries + " le WHERE le.tbl = $1 ORDER BY le.off DESC LIMIT 1)), 0)"
}

// The broker's own tables, in the connector's schema. Their names hold a
// "/", which no record table's name can, so no channel can ever take them.
const (
	// epochsTable holds one row per life of a channel's table: the table
	// offset its stream counts from (base), its epoch, the table's oid, and
	// when the channel's metadata expires (MetaTTL).
	epochsTable = "centrifuge/epochs"
	// streamTable indexes the broker's log entries by table offset: their
	// position in the log, their stream offset and epoch, and what the log
	// does not keep (the tags of a removal, the previous value of a delta
	// publication).
	streamTable = "centrifuge/stream"
	// idempotencyTable holds the results of publications and removals made
	// with an IdempotencyKey, until they expire.
	idempotencyTable = "centrifuge/idempotency"
	// expiryTable holds when each key of a channel with a KeyTTL expires.
	expiryTable = "centrifuge/expiry"
)

// lockClass is the first half of the broker's advisory locks, which use the
// two-integer key space: pgstore's own advisory locks use the bigint one,
// and the two never overlap, so no hash collision can make the broker wait
// for pgstore's DDL lock while holding what it waits for.
const lockClass = 0x63656e74 // "cent"

// sqlSet is the SQL of one schema, built once with every identifier quoted.
type sqlSet struct {
	schema string

	createTables               []string
	readLog                    string
	lockExclusive              string
	lockHead                   string
	meta                       string
	metaExpired                string
	idemRead, idemWrite        string
	keysExpired                string
	streamWrite                string
	expirySet, expiryDelete    string
	expiryRefresh              string
	metaTouch, metaClear       string
	epochInsert                string
	streamRead                 string
	streamRow                  string
	oldestEntry                string
	epochBefore                string
	expiredKeys                string
	expiredChannels            string
	cleanupStream, cleanupIdem string
	cleanupEpochs              string
	forgetChannel              []string
}

func newSQL(schema string) *sqlSet {
	q := func(name string) string { return pgx.Identifier{schema, name}.Sanitize() }
	head, entries, offsets := q(logHead), q(logEntries), q(logOffsets)
	epochs, stream, idem, expiry := q(epochsTable), q(streamTable), q(idempotencyTable), q(expiryTable)
	s := &sqlSet{schema: schema}
	s.createTables = []string{
		"CREATE TABLE IF NOT EXISTS " + epochs + ` (tbl text COLLATE "C" NOT NULL, base bigint NOT NULL, epoch text NOT NULL,
			tbl_oid oid NOT NULL, meta_expires timestamptz, created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tbl, base))`,
		"CREATE TABLE IF NOT EXISTS " + stream + ` (tbl text COLLATE "C" NOT NULL, off bigint NOT NULL, position bigint NOT NULL,
			epoch text NOT NULL, roff bigint NOT NULL, tags jsonb, prev jsonb, at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tbl, off))`,
		"CREATE INDEX IF NOT EXISTS " + pgx.Identifier{"centrifuge/stream_position"}.Sanitize() + " ON " + stream + " (position)",
		"CREATE TABLE IF NOT EXISTS " + idem + ` (tbl text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL, epoch text NOT NULL,
			roff bigint NOT NULL, expires_at timestamptz NOT NULL, PRIMARY KEY (tbl, key))`,
		"CREATE INDEX IF NOT EXISTS " + pgx.Identifier{"centrifuge/idempotency_expires"}.Sanitize() + " ON " + idem + " (expires_at)",
		"CREATE TABLE IF NOT EXISTS " + expiry + ` (tbl text COLLATE "C" NOT NULL, id text COLLATE "C" NOT NULL,
			expires_at timestamptz NOT NULL, PRIMARY KEY (tbl, id))`,
		"CREATE INDEX IF NOT EXISTS " + pgx.Identifier{"centrifuge/expiry_at"}.Sanitize() + " ON " + expiry + " (expires_at)",
	}
	s.readLog = "SELECT replace(log_id::text, '-', ''), active FROM " + head
	// The schema's lock is taken exclusive by New, to make the broker's
	// tables. A channel's lock is taken exclusive by what makes or ends the
	// channel's table (ensure, Clear), and shared by every change of the
	// broker, before the log's head, which is the lock every writer of the
	// schema takes first (pgstore's batches, the BEFORE STATEMENT trigger of
	// every record table). A change only tries for it: no row, and so no
	// head lock, while the channel is being made or dropped; it waits
	// without holding a connection (see retry). A try that conflicts with
	// a waiting exclusive lock fails too, so Clear is never starved.
	s.lockExclusive = "SELECT pg_advisory_xact_lock($1::int4, hashtext($2))"
	// Once it holds the head, it says so in pgstore's setting, so that the
	// head-lock trigger of each statement that writes a record is skipped:
	// set over the rows already locked, as pgstore's batches do, since in
	// the scan below the lock it would be set before the lock is taken.
	//
	// It also makes the transaction's statements take their generic plans:
	// the plan cache judges the stream write's (a join with the partitioned
	// log) dearer than a custom plan, and would plan it at every change,
	// for about as long as the statement then takes to run.
	s.lockHead = "SELECT set_config('pgstore.head_locked', $3, true) IS NOT NULL AND " +
		"set_config('plan_cache_mode', 'force_generic_plan', true) IS NOT NULL FROM (SELECT FROM " + head +
		" WHERE pg_try_advisory_xact_lock_shared($1::int4, hashtext($2)) FOR UPDATE) AS locked"
	// Everything a change or a read needs to know of a channel, in one
	// statement (so in one snapshot). $1 is the table's name, $2 the
	// schema's. The table is looked up in pg_class rather than with
	// to_regclass, whose cache may not yet know of a table another session
	// just made.
	s.meta = `SELECT replace(h.log_id::text, '-', ''), ` + logEndSQL(entries) + `, h.dropped,
		(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $2 AND c.relname = $1),
		` + tableOffsetSQL(entries, offsets) + `,
		e.base, e.epoch, e.tbl_oid, e.meta_expires,
		(SELECT st.at FROM ` + stream + ` st WHERE st.tbl = $1 ORDER BY st.off DESC LIMIT 1), now()
		FROM ` + head + ` h LEFT JOIN LATERAL (SELECT base, epoch, tbl_oid, meta_expires FROM ` + epochs + ` WHERE tbl = $1 ORDER BY base DESC LIMIT 1) e ON true`
	s.metaExpired = "SELECT coalesce(meta_expires <= now(), false) FROM " + epochs + " WHERE tbl = $1 ORDER BY base DESC LIMIT 1"
	s.keysExpired = "SELECT id FROM " + expiry + " WHERE tbl = $1 AND id = ANY($2::text[]) AND expires_at <= now() FOR UPDATE"
	s.idemRead = "SELECT key, epoch, roff FROM " + idem + " WHERE tbl = $1 AND key = ANY($2::text[]) AND expires_at > now()"
	s.idemWrite = "INSERT INTO " + idem + ` AS t (tbl, key, epoch, roff, expires_at) VALUES ($1, $2, $3, $4, now() + $5::interval)
		ON CONFLICT (tbl, key) DO UPDATE SET epoch = excluded.epoch, roff = excluded.roff, expires_at = excluded.expires_at`
	// The entries that the statement just before it made must be the ones
	// predicted: the log must end at $3 and the table's offsets at $2, and
	// each entry must be at its predicted position with its key and offset.
	// Were one not (a trigger missing, an event switched off, a row not
	// there), off or position is NULL and the NOT NULL constraint aborts the
	// transaction, with the COMMIT queued behind it. Each entry is found by
	// its position, one index probe (the LIMIT keeps the planner from
	// making it a join, which a generic plan would do with a scan of the
	// whole log).
	s.streamWrite = "INSERT INTO " + stream + ` (tbl, off, position, epoch, roff, tags, prev)
		SELECT $1, CASE WHEN hl.off = $2 AND le.off = w.off THEN w.off END, CASE WHEN hl.position = $3 AND le.id = w.id THEN w.position END, $4, w.roff, w.tags, w.prev
		FROM (SELECT ` + logEndSQL(entries) + ` AS position, ` + tableOffsetSQL(entries, offsets) + ` AS off FROM ` + head + ` h) hl,
			unnest($5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::jsonb[], $10::jsonb[]) AS w(id, off, position, roff, tags, prev)
			LEFT JOIN LATERAL (SELECT le.id, le.off FROM ` + entries + ` le WHERE le.position = w.position AND le.tbl = $1 LIMIT 1) le ON true`
	s.expirySet = "INSERT INTO " + expiry + ` (tbl, id, expires_at) VALUES ($1, $2, now() + $3::interval)
		ON CONFLICT (tbl, id) DO UPDATE SET expires_at = excluded.expires_at`
	s.expiryDelete = "DELETE FROM " + expiry + " WHERE tbl = $1 AND id = ANY($2::text[])"
	s.expiryRefresh = "UPDATE " + expiry + " SET expires_at = now() + $3::interval WHERE tbl = $1 AND id = $2"
	s.metaTouch = "UPDATE " + epochs + " SET meta_expires = now() + $3::interval WHERE tbl = $1 AND base = $2"
	s.metaClear = "UPDATE " + epochs + " SET meta_expires = NULL WHERE tbl = $1 AND base = $2 AND meta_expires IS NOT NULL"
	s.epochInsert = "INSERT INTO " + epochs + " (tbl, base, epoch, tbl_oid) VALUES ($1, $2, $3, $4) ON CONFLICT (tbl, base) DO UPDATE SET epoch = excluded.epoch, tbl_oid = excluded.tbl_oid"
	// The entries of a table between two offsets, through the broker's
	// index: each is found in the log by its position (the log's only
	// index), one probe per entry.
	s.streamRead = `SELECT st.off, st.roff, st.epoch, st.tags, st.at, e.op::text, e.id, e.val
		FROM ` + stream + ` st LEFT JOIN LATERAL (SELECT le.op, le.id, le.val FROM ` + entries + ` le
			WHERE le.position = st.position AND le.tbl = st.tbl AND le.off = st.off) e ON true
		WHERE st.tbl = $1 AND st.off BETWEEN $2 AND $3 AND st.position > $4 ORDER BY st.off`
	// The oldest entry of the channel's last life that the log still holds.
	s.oldestEntry = "SELECT min(off) FROM " + stream + " WHERE tbl = $1 AND position > (SELECT dropped FROM " + head + ")" +
		" AND off > coalesce((SELECT max(base) FROM " + epochs + " WHERE tbl = $1), 0)"
	s.streamRow = "SELECT epoch, roff, tags, prev, at FROM " + stream + " WHERE tbl = $1 AND off = $2"
	s.epochBefore = "SELECT base, epoch FROM " + epochs + " WHERE tbl = $1 AND base < $2 ORDER BY base DESC LIMIT 1"
	s.expiredKeys = "SELECT tbl, id FROM " + expiry + " WHERE expires_at <= now() ORDER BY expires_at LIMIT $1"
	s.expiredChannels = "SELECT DISTINCT tbl FROM " + epochs + " WHERE meta_expires <= now() LIMIT $1"
	s.cleanupStream = "DELETE FROM " + stream + " WHERE position <= (SELECT dropped FROM " + head + ")"
	s.cleanupIdem = "DELETE FROM " + idem + " WHERE expires_at <= now()"
	// Lives of a channel other than its last, once a day old: only a
	// subscription a day behind could still ask for them.
	s.cleanupEpochs = "DELETE FROM " + epochs + " e WHERE created_at < now() - interval '1 day' AND base < (SELECT max(base) FROM " + epochs + " l WHERE l.tbl = e.tbl)"
	s.forgetChannel = []string{
		"DELETE FROM " + idem + " WHERE tbl = $1",
		"DELETE FROM " + expiry + " WHERE tbl = $1",
		"UPDATE " + epochs + " SET meta_expires = NULL WHERE tbl = $1",
	}
	return s
}

// table returns the quoted identifier of a channel's record table.
func (s *sqlSet) table(channel string) string {
	return pgx.Identifier{s.schema, channel}.Sanitize()
}

func (s *sqlSet) recordRead(channel string) string {
	return "SELECT id, version, val FROM " + s.table(channel) + " WHERE id = ANY($1::text[]) ORDER BY id"
}

// The writes of records, a statement for many: each statement appends its
// rows to the log in id order ($1, in that order), one entry each.
func (s *sqlSet) recordInsert(channel string) string {
	return "INSERT INTO " + s.table(channel) + " (id, version, val) SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[])"
}

func (s *sqlSet) recordUpdate(channel string) string {
	return "UPDATE " + s.table(channel) + " t SET version = w.version, val = w.val FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) AS w(id, version, val) WHERE t.id = w.id"
}

func (s *sqlSet) recordDelete(channel string) string {
	return "DELETE FROM " + s.table(channel) + " WHERE id = ANY($1::text[])"
}

func (s *sqlSet) statePage(channel string) string {
	return "SELECT id, version, val FROM " + s.table(channel) + " WHERE id > $1 ORDER BY id LIMIT $2"
}

func (s *sqlSet) count(channel string) string {
	return "SELECT count(*) FROM " + s.table(channel)
}
