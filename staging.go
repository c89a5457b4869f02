package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Large batches travel by COPY, which the server takes in faster than the
// same rows as array parameters: binary COPY into a temporary staging table,
// then one INSERT … SELECT from it per table. That costs a few round trips
// more than a pipeline of array upserts, which is why it is kept for tables
// with at least stageMinRows sets in the batch.
//
// The staging table belongs to the session: created, if missing, by the
// statement that begins the transaction, so that it exists on whichever
// server session the transaction runs (also behind a bouncer in transaction
// mode); ON COMMIT DELETE ROWS empties it at every commit, without the
// catalog churn of a TRUNCATE.
const stageMinRows = 2000

// defaultStagingRenewal bounds how long a session keeps one file for its
// staging table. Emptied in place at commit, the table keeps its
// relfrozenxid, and autovacuum cannot freeze another session's temporary
// table: it would hold back the database's datfrozenxid, and so make
// wraparound vacuums run in vain, for as long as the connection lives. A
// TRUNCATE gives it a new file, frozen as of now.
const defaultStagingRenewal = 10 * time.Minute

// stagingRenewed is the key, in a connection's CustomData, of when its
// staging table last got a new file.
const stagingRenewed = "pgstore.stagingRenewed"

var (
	stagingTable   = pgx.Identifier{"pg_temp", "pgstore_staging"}
	stagingColumns = []string{"id", "version", "val"}
	// The notice that the table exists would reach, on every flush, a pool
	// that logs notices: SET LOCAL silences it, then gives the rest of the
	// transaction the session's default back.
	beginStaging = "BEGIN; SET LOCAL client_min_messages = warning; " +
		"CREATE TEMP TABLE IF NOT EXISTS pgstore_staging (id text COLLATE \"C\", version bigint, val jsonb) ON COMMIT DELETE ROWS; " +
		"SET LOCAL client_min_messages TO DEFAULT"
	renewStaging = "; TRUNCATE " + stagingTable.Sanitize()
	clearStaging = "DELETE FROM " + stagingTable.Sanitize()
)

// errNoStaging says that the role may not create the staging table.
var errNoStaging = errors.New("pgstore: no staging table")

// stages reports whether a batch goes through the staging table.
func (s *sqlSink) stages(tables []*tableBatch) bool {
	if s.c.noStaging.Load() {
		return false
	}
	for _, tb := range tables {
		if len(tb.sets) >= stageMinRows {
			return true
		}
	}
	return false
}

// writeStaged writes a batch in one explicit transaction, copying the sets
// of each large table into the staging table; tables are written in name
// order, as in a pipelined batch. It reports whether the commit was sent.
func (s *sqlSink) writeStaged(ctx context.Context, tables []*tableBatch, token string) (commitSent bool, be backend, err error) {
	c := s.c
	conn, be, err := s.acquire(ctx)
	if err != nil {
		return false, be, err
	}
	defer conn.Release()
	session := conn.Conn().PgConn().CustomData()
	begin := beginStaging
	renewed, _ := session[stagingRenewed].(time.Time)
	renew := time.Since(renewed) >= c.cfg.stagingRenewal
	if renew {
		begin += renewStaging
	}
	if c.logged.Load() {
		begin += "; " + lockHeadSQL(c.cfg.schema) // see lockHeadSQL
	}
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{BeginQuery: begin})
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			// No TEMPORARY privilege on the database: write as arrays.
			if !c.noStaging.Swap(true) {
				c.cfg.logger.Warn("pgstore: the role may not create temporary tables, so large batches go as array upserts, which is slower",
					"fix", "GRANT TEMPORARY ON DATABASE <database> TO <role>", "err", err)
			}
			return false, be, errNoStaging
		}
		return false, be, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // after Commit it does nothing
	var pb pgx.Batch
	staged := false // the staging table holds rows already written
	for _, tb := range tables {
		stage := len(tb.sets) >= stageMinRows
		if stage {
			if staged {
				pb.Queue(clearStaging)
			}
			if pb.Len() > 0 {
				if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
					return false, be, err
				}
				pb = pgx.Batch{}
			}
			sets := tb.sets
			rows := pgx.CopyFromSlice(len(sets), func(i int) ([]any, error) {
				return []any{sets[i].ID, sets[i].Version, json.RawMessage(sets[i].Value)}, nil
			})
			if _, err := tx.CopyFrom(ctx, stagingTable, stagingColumns, rows); err != nil {
				return false, be, err
			}
			staged = true
		}
		s.queueWrites(&pb, tb, token, stage)
	}
	// The marker goes with the last statements, where it costs no round
	// trip of its own; where in the transaction it is makes no difference.
	s.queueMarker(&pb, token, false) // the head is locked at the BEGIN
	if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
		return false, be, err
	}
	if err := tx.Commit(ctx); err != nil {
		return true, be, err
	}
	if renew {
		session[stagingRenewed] = time.Now()
	}
	return true, be, nil
}
