package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgstore/pgstore/internal/backoff"
	"github.com/pgstore/pgstore/internal/writebuf"
)

// A lost commit reply must be resolved, not guessed: re-applying a batch
// that did commit can revert another node's newer write, and a batch held
// up on the network (its bytes delayed in a partition) can commit after a
// later write to the same keys. So every attempt inserts a token into the
// schema's "pgstore/commits" table, first thing in its transaction, and
// when its answer is lost:
//
//  1. its backend is ended with pg_terminate_backend (a role may end its
//     own sessions) and seen gone, so that whatever it was doing is rolled
//     back and nothing more reaches it;
//  2. the token is claimed by a new transaction. If the token is there
//     already, the attempt committed. If the claim commits, the attempt did
//     not, and never can: were its bytes to arrive after all, its own
//     insert of the token would fail and take the transaction with it.
//
// Step 2 alone fences an attempt that has not started; step 1 ends one that
// holds the token uncommitted, which would otherwise make the claim wait,
// and one behind a pooler (where the backend is not known) relies on step
// 2 and the claim's lock timeout. Tokens of settled attempts are deleted by
// a later batch's transaction, spentBatch at a time, and by Close, so the
// table holds a few dozen rows per running connector.

// Names of pgstore's own tables in the schema. A record table's name never
// holds a "/", so these can never be a record table's.
const (
	commitsTable = "pgstore/commits"
	refusedTable = "pgstore/refused"
)

// markerTablesSQL creates the tables of commit markers and of the ids the
// version guard refused in a committed batch.
func markerTablesSQL(schema string) []string {
	commits := pgx.Identifier{schema, commitsTable}.Sanitize()
	refused := pgx.Identifier{schema, refusedTable}.Sanitize()
	return []string{
		// claimed marks a token inserted by a claim, not by its attempt:
		// a claim whose own answer was lost must not, asked again, take
		// its own row for the attempt's.
		"CREATE TABLE IF NOT EXISTS " + commits + " (token uuid PRIMARY KEY, claimed boolean NOT NULL DEFAULT false, at timestamptz NOT NULL DEFAULT now())",
		"CREATE TABLE IF NOT EXISTS " + refused + " (token uuid NOT NULL, tbl text NOT NULL, id text NOT NULL, at timestamptz NOT NULL DEFAULT now())",
		"CREATE INDEX IF NOT EXISTS " + pgx.Identifier{"pgstore/refused_token"}.Sanitize() + " ON " + refused + " (token)",
		"CREATE TABLE IF NOT EXISTS " + pgx.Identifier{schema, settingsTable}.Sanitize() + " (one boolean PRIMARY KEY DEFAULT true CHECK (one), events smallint, change_log_off boolean NOT NULL DEFAULT false)",
	}
}

// markerSweepAge is how old a marker left behind (by a process that ended
// before its next batch) must be for a new connector to delete it.
const markerSweepAge = "1 day"

func sweepMarkersSQL(schema string) []string {
	return []string{
		"DELETE FROM " + pgx.Identifier{schema, commitsTable}.Sanitize() + " WHERE at < now() - interval '" + markerSweepAge + "'",
		"DELETE FROM " + pgx.Identifier{schema, refusedTable}.Sanitize() + " WHERE at < now() - interval '" + markerSweepAge + "'",
	}
}

// sqlSink is the Connector as the write buffer's Sink. The buffer calls it
// from one goroutine.
type sqlSink struct {
	c *Connector
	// lost is the attempt whose answer was lost, until Resolve settles it.
	lost *lostAttempt
	// abandoned are attempts whose outcome nobody waits for any more (the
	// buffer gave up on them, or they never sent their commit): each is
	// fenced before the next batch goes out.
	abandoned []lostAttempt
	// spent are tokens of settled attempts, deleted by a later batch (see
	// spentBatch); the last marker queued deletes the first deleting.
	spent    []string
	deleting int
}

// spentBatch is how many spent tokens gather before a batch deletes them.
// Deleting costs a one-row batch more than the rest of its marker (about a
// tenth of its time, measured), so it is paid once in so many batches.
const spentBatch = 32

type lostAttempt struct {
	batch   *writebuf.Batch
	token   string
	backend backend
}

// backend identifies a server process; the zero value is none known.
type backend struct {
	pid   int32
	start time.Time
}

// backendKey is the key, in a connection's CustomData, of its backend.
const backendKey = "pgstore.backend"

func newToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])  // never fails
	b[6] = b[6]&0x0f | 0x40 // a version 4 UUID
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b[:])
}

// queueMarker queues the insert of the attempt's token, which also deletes
// the tokens of settled attempts once spentBatch of them have gathered. With
// lockHead, on a schema with a change log, the same statement takes the log's
// head lock first thing in the transaction (see lockHeadSQL): a statement
// fewer in every flush, which a one-row flush measures. The marker's parts
// then read the lock's row, so that they run after it: the parts of one
// statement run in no set order otherwise.
func (s *sqlSink) queueMarker(pb *pgx.Batch, token string, lockHead bool) {
	schema := s.c.cfg.schema
	commits := pgx.Identifier{schema, commitsTable}.Sanitize()
	locked := lockHead && s.c.logged.Load()
	after := "" // what makes a part wait for the lock
	var with []string
	if locked {
		with = append(with, "locked AS ("+lockHeadSQL(schema)+")")
		after = " AND EXISTS (SELECT FROM locked)"
	}
	args := []any{token}
	s.deleting = 0
	if len(s.spent) >= spentBatch {
		s.deleting = len(s.spent)
		with = append(with, "spent AS ("+spentDeleteSQL(schema, commitsTable, "$2")+after+")")
		if s.c.cfg.versionGuard {
			with = append(with, "refused AS ("+spentDeleteSQL(schema, refusedTable, "$2")+after+")")
		}
		args = append(args, s.spent)
	}
	main := "INSERT INTO " + commits + " (token) VALUES ($1::uuid)"
	if locked {
		main = "INSERT INTO " + commits + " (token) SELECT $1::uuid FROM locked"
	}
	if len(with) > 0 {
		main = "WITH " + strings.Join(with, ", ") + " " + main
	}
	pb.Queue(main, args...)
}

// spentDeleteSQL deletes from one of the marker tables the rows of the spent
// tokens that the parameter param holds.
func spentDeleteSQL(schema, table, param string) string {
	return "DELETE FROM " + pgx.Identifier{schema, table}.Sanitize() + " WHERE token = ANY(" + param + "::uuid[])"
}

// committed records that the attempt with token committed, and with it the
// deletion of the tokens its marker carried.
func (s *sqlSink) committed(token string) {
	s.spent = append(s.spent[:0], s.spent[s.deleting:]...)
	s.spent = append(s.spent, token)
	s.deleting = 0
}

// Resolve finds out whether the lost attempt at b committed.
func (s *sqlSink) Resolve(ctx context.Context, b *writebuf.Batch) (bool, error) {
	a := s.lost
	if a == nil || a.batch != b {
		return false, fmt.Errorf("pgstore: internal error: no lost attempt of this batch to resolve")
	}
	conn, err := s.connectAside(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	committed, err := s.fence(ctx, conn, *a)
	if err != nil {
		return false, err
	}
	if committed && s.c.cfg.versionGuard {
		if err := s.readRefused(ctx, conn, b, a.token); err != nil {
			return false, err
		}
	}
	s.lost = nil
	s.settle(*a, committed)
	if committed {
		s.c.logWritten()
	}
	return committed, nil
}

// settle records that an attempt can no longer commit: its token may be
// deleted with the next batch if the attempt committed (the row is its own)
// or its backend was ended (nothing can reach it any more). A claim that is
// all that fences an attempt whose backend is not known (behind a pooler)
// stays, until the sweep of markers a day old: bytes held up in a network
// are delivered, or given up, long before.
func (s *sqlSink) settle(a lostAttempt, committed bool) {
	if committed || a.backend.pid != 0 {
		s.spent = append(s.spent, a.token)
	}
}

// fenceAbandoned fences the attempts nobody waits for any more, before b
// goes out.
func (s *sqlSink) fenceAbandoned(ctx context.Context, b *writebuf.Batch) error {
	if s.lost != nil && s.lost.batch != b {
		s.abandoned = append(s.abandoned, *s.lost)
		s.lost = nil
	}
	if len(s.abandoned) == 0 {
		return nil
	}
	conn, err := s.connectAside(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	for len(s.abandoned) > 0 {
		a := s.abandoned[0]
		committed, err := s.fence(ctx, conn, a)
		if err != nil {
			return err
		}
		s.abandoned = s.abandoned[1:]
		s.settle(a, committed)
	}
	return nil
}

// fenceOnClose fences, as the connector closes, an attempt whose outcome
// was given up as unknown and that no later batch fenced: otherwise it could
// still commit. It has a context of its own, since Close's may have ended.
func (s *sqlSink) fenceOnClose() error {
	if s.lost == nil && len(s.abandoned) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), closeFenceTimeout)
	defer cancel()
	return s.fenceAbandoned(ctx, nil)
}

// closeFenceTimeout bounds how long Close tries to fence such an attempt.
const closeFenceTimeout = 5 * time.Second

// deleteSpentOnClose deletes, once the flusher has ended, the tokens of
// settled attempts that no later batch will: a connector that closes leaves
// no markers of its own behind but the claims that still fence. It is best
// effort, within closeFenceTimeout: what it leaves, the sweep of markers a
// day old removes.
func (s *sqlSink) deleteSpentOnClose(ctx context.Context) error {
	if len(s.spent) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, closeFenceTimeout)
	defer cancel()
	schema := s.c.cfg.schema
	var pb pgx.Batch
	pb.Queue(spentDeleteSQL(schema, commitsTable, "$1"), s.spent)
	if s.c.cfg.versionGuard {
		pb.Queue(spentDeleteSQL(schema, refusedTable, "$1"), s.spent)
	}
	if err := s.c.pool.SendBatch(ctx, &pb).Close(); err != nil && !isUndefinedTable(err) {
		return err // (a schema destroyed took its markers with it)
	}
	s.spent = nil
	return nil
}

// connectAside opens a connection of its own for fencing: the pool may be
// full of connections that are lost but not yet closed (pgx gives a silent
// peer up to 15 s to take its goodbye).
func (s *sqlSink) connectAside(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, s.c.pool.Config().ConnConfig)
	if err != nil {
		return nil, fmt.Errorf("connect to resolve a lost answer: %w", err)
	}
	return conn, nil
}

// claimLockTimeout bounds how long a claim waits for an attempt that holds
// the token uncommitted and could not be ended.
const claimLockTimeout = "1s"

// fence makes sure that attempt a can no longer commit, and reports whether
// it did.
func (s *sqlSink) fence(ctx context.Context, conn *pgx.Conn, a lostAttempt) (committed bool, err error) {
	if a.backend.pid != 0 {
		if err := endBackend(ctx, conn, a.backend); err != nil {
			return false, err
		}
	}
	commits := pgx.Identifier{s.c.cfg.schema, commitsTable}.Sanitize()
	var claimed bool
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '"+claimLockTimeout+"'"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+commits+" (token, claimed) VALUES ($1::uuid, true) ON CONFLICT DO NOTHING", a.token); err != nil {
			return err
		}
		// The row is the claim's (this one's, or an earlier one whose
		// answer was lost) or the attempt's.
		return tx.QueryRow(ctx, "SELECT claimed FROM "+commits+" WHERE token = $1::uuid", a.token).Scan(&claimed)
	})
	if err != nil {
		return false, fmt.Errorf("claim the marker of the batch: %w", err)
	}
	return !claimed, nil
}

// endBackend terminates a server process of ours, if it still runs, and
// waits until it is gone.
func endBackend(ctx context.Context, conn *pgx.Conn, be backend) error {
	_, err := conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2",
		be.pid, be.start)
	if err != nil {
		return fmt.Errorf("end the backend of the batch (pid %d): %w", be.pid, err)
	}
	wait := backoff.Backoff{Min: 2 * time.Millisecond, Max: 100 * time.Millisecond}
	for {
		var alive bool
		err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2)",
			be.pid, be.start).Scan(&alive)
		if err != nil {
			return fmt.Errorf("see the backend of the batch (pid %d) gone: %w", be.pid, err)
		}
		if !alive {
			return nil
		}
		if !backoff.Sleep(ctx, wait.Next()) {
			return fmt.Errorf("see the backend of the batch (pid %d) gone: %w", be.pid, ctx.Err())
		}
	}
}

// readRefused gives the sets of a committed batch that the version guard
// kept out their error, from what the batch recorded under its token.
func (s *sqlSink) readRefused(ctx context.Context, conn *pgx.Conn, b *writebuf.Batch, token string) error {
	rows, err := conn.Query(ctx, "SELECT tbl, id FROM "+pgx.Identifier{s.c.cfg.schema, refusedTable}.Sanitize()+" WHERE token = $1::uuid", token)
	if err != nil {
		return fmt.Errorf("read what the version guard refused: %w", err)
	}
	refused := make(map[string][]string)
	var tbl, id string
	_, err = pgx.ForEachRow(rows, []any{&tbl, &id}, func() error {
		refused[tbl] = append(refused[tbl], id)
		return nil
	})
	if err != nil {
		return fmt.Errorf("read what the version guard refused: %w", err)
	}
	for _, wt := range b.Tables {
		ids := refused[wt.Name]
		if len(ids) == 0 {
			continue
		}
		// The versions that kept them out, as stored now: the same, or
		// newer ones written since.
		rows, err := conn.Query(ctx, "SELECT r.id, coalesce(t.version, 0) FROM unnest($1::text[]) r(id) LEFT JOIN "+
			pgx.Identifier{s.c.cfg.schema, wt.Name}.Sanitize()+" t ON t.id = r.id", ids)
		if err != nil {
			return fmt.Errorf("read the versions that the version guard kept: %w", err)
		}
		stored, err := collectRefused(rows)
		if err != nil {
			return fmt.Errorf("read the versions that the version guard kept: %w", err)
		}
		s.tableBatch(wt).markRefused(stored)
	}
	return nil
}
