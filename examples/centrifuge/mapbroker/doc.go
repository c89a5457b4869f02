// Package mapbroker is a centrifuge.MapBroker (centrifuge v0.40) on a
// pgstore connector: the map channels of a cluster of centrifuge nodes live
// in one PostgreSQL schema, their state in pgstore's record tables and their
// stream in pgstore's change log, and every node learns of every change from
// the log. Use it where the nodes already share PostgreSQL through pgstore
// and a Redis beside it is one system too many.
//
//	store, _ := pgstore.New(ctx, pool, pgstore.WithChangeLog(time.Hour))
//	broker, _ := mapbroker.New(node, mapbroker.Config{Store: store, Pool: pool})
//	node.SetMapBroker(broker)
//
// # Mapping
//
// A channel is a pgstore table (so its name is a table name: at most 63
// bytes, no "/"), a key is a record id, an entry is a record, and the
// channel's stream is the table's entries in the change log: the stream
// offset n is the table's log offset base+n, where base is the table's
// offset when the channel's life began (see channel.go). A record's
// version is the stream offset of the change that last wrote it, which is
// what a state entry's Offset and compare-and-swap use.
//
// # Encoding
//
// A record's value is a JSON envelope: {"centrifuge":1, "epoch", "data" or
// "data_b64", "tags", "info", "time", "version", "version_epoch", "delta"}.
// Publication data that is valid UTF-8 without NUL is kept as a JSON string,
// byte for byte (so a JSON payload reads in SQL as (val->>'data')::jsonb);
// any other data, binary included, is kept in standard base64. Either way
// the bytes read back, from the state, the stream or a delivery, are the
// bytes published. Client info's ConnInfo and ChanInfo go the same way.
// Tags, client and user ids, version epochs and idempotency keys must be
// valid UTF-8 without NUL: PostgreSQL cannot store others exactly, and they
// are refused with ErrInvalidValue. A record written to the table with
// pgstore directly reads as an entry whose data is its JSON.
//
// # Epochs
//
// A channel's epoch is named after the change log's id and the table's
// offset when its life began. Clear drops the table with pgstore's
// DropTable; the next life begins at a later offset, so its epoch is new,
// and a log made again (a schema destroyed and created) has a new id. A
// channel without a table reports the epoch its next life will take, so
// that reading an empty channel and then publishing to it keeps one epoch.
//
// # Atomicity
//
// A change is one transaction of the broker's own that holds the log's head
// lock, pgstore's lock for every writer of the schema: it reads the key,
// checks idempotency, version, key mode and expected position (in the order
// of centrifuge's own brokers), writes the record, its stream index row, the
// idempotency result and the key's expiry, and commits, in two round trips.
// Holding the head, it is the schema's only writer, so what it read holds
// until it commits, and the log position and table offset of its entry are
// known in advance (and checked). Changes of one channel that wait for each
// other are made in one such transaction, each decided after the one before
// it as if it ran alone, and acknowledged at the group's commit; a group that
// fails writes nothing, and its changes run alone. See write.go and group.go.
//
// # Delivery
//
// RegisterEventHandler starts one pgstore subscription that follows the
// log; the publications of the channels a node subscribes to, its own
// included, reach its handler in stream order with their positions. A node
// that falls behind lags, it does not drop; one that falls behind the log's
// retention is told by pgstore (logged here), and centrifuge's position
// checks make its clients recover.
//
// # What is honoured, and what is refused
//
// MapModePersistent and MapModeRecoverable work, with KeyTTL (keys expire
// into the stream as removals, within ExpireInterval), RefreshTTLOnSuppress,
// MetaTTL (an idle channel is cleared; reads renew it, at most one write per
// half MetaTTL), StreamSize and StreamTTL (the stream holds the last
// StreamSize entries, until StreamTTL after the last one, as centrifuge's
// own streams), UseDelta (a delivery carries the entry it replaced),
// IdempotencyKey with IdempotentResultTTL, Version/VersionEpoch, KeyMode and
// ExpectedPosition. MapModeEphemeral is refused with ErrUnsupported: the log
// records every change, so a channel always has a stream. An unknown
// KeyMode is refused too. AllowCached is ignored: every read is of the
// primary. Ordered (scored) state cannot be configured in centrifuge's API
// and is not offered.
//
// Where this broker differs from centrifuge's memory broker, on purpose: a
// Since older than what the stream holds (its StreamSize, its StreamTTL, or
// pgstore's log retention) is ErrorUnrecoverablePosition, never the part
// that is left; and a read across an entry written to the table without the
// broker (which leaves no index row) is unrecoverable rather than holed.
// Delivery of such entries is best effort (data, no tags).
//
// # What this relies on in pgstore
//
// pgstore offers no transactional writes, table creation without a write,
// or reads of the log by table, so the broker uses these internals of a
// schema with the change log, by name (see sql.go):
//
//   - "pgstore/log", the log's head row: log_id (the epoch's name), position
//     (a floor of the log's end: see below), dropped (the last position
//     retention removed), active (the log is on); and its row lock, taken
//     FOR UPDATE, which every pgstore batch and
//     every record table's BEFORE STATEMENT trigger take first and hold to
//     commit. The transaction-local setting pgstore.head_locked, set to the
//     schema's name once the lock is held, spares those triggers taking it
//     again.
//   - "pgstore/log_offsets" (tbl, off): a floor of a table's last log
//     offset; kept when the table is dropped, so offsets only grow per
//     table name.
//   - "pgstore/log_entries" (position, off, tbl, op, id, version, val),
//     read by position and by table and offset, its indexes. The log ends
//     at the greater of the head's position and its last entry's; a table's
//     offsets at the greater of its floor and its last entry's (see
//     logEndSQL).
//   - The triggers' behaviour: a statement that changes one row appends one
//     entry, at the log's end plus one and the table's offset plus one,
//     with the row's version and (for inserts and updates) its value.
//   - A record table "<table>" (id text COLLATE "C", version bigint, val
//     jsonb), written with plain INSERT, UPDATE and DELETE.
//   - Exported API: Schema, Query (to check the store and the pool see one
//     log), Set and Delete of a sentinel record (to have pgstore create a
//     channel's table with its triggers), DropTable (Clear), Subscribe and
//     Event's Table, ID, Version, Value and Offset (delivery), MaxIDBytes.
//
// The broker's own state is in tables of its own in the same schema, whose
// names hold a "/" so no channel can take them: "centrifuge/epochs" (the
// lives of each channel), "centrifuge/stream" (an index of the broker's log
// entries by table offset, with a removal's tags and a delta's previous
// value), "centrifuge/idempotency" and "centrifuge/expiry". Its advisory
// locks use the two-integer key space, which pgstore's never use.
//
// # Operating
//
// Give the broker the pool the store writes with, or another on the same
// database; the store's own pool needs at least 2 connections, since making
// a channel's table holds one while pgstore writes with another. Write a
// channel's table only through the broker. pgstore's log retention
// (WithChangeLog) should exceed the channels' StreamTTL; entries it drops
// first are unrecoverable, never missing.
package mapbroker
