package pgstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// ---- Connect, New and options ----

func TestConnectAndNewRefuseInvalidOptionsNamingTheOption(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("s", 64)
	cases := []struct {
		name string
		opt  pgstore.Option
		want []string // fragments of the error message
	}{
		{"negative write interval", pgstore.WithWriteInterval(-1), []string{"WithWriteInterval", "negative"}},
		{"zero batch size", pgstore.WithMaxBatchSize(0), []string{"WithMaxBatchSize", "at least 1"}},
		{"zero buffer limit", pgstore.WithBufferLimit(0), []string{"WithBufferLimit", "at least 1"}},
		{"schema of 64 bytes", pgstore.WithSchema(long), []string{"WithSchema", "64 bytes", "63"}},
		{"empty schema", pgstore.WithSchema(""), []string{"WithSchema", "empty"}},
		{"default table of 64 bytes", pgstore.WithDefaultTable(long), []string{"WithDefaultTable", "64 bytes", "63"}},
		{"empty default table", pgstore.WithDefaultTable(""), []string{"WithDefaultTable", "empty"}},
		{"negative retry timeout", pgstore.WithRetryTimeout(-1), []string{"WithRetryTimeout", "negative"}},
		{"the system catalog", pgstore.WithSchema("pg_catalog"), []string{"WithSchema", "PostgreSQL's own schema"}},
		{"the toast schema", pgstore.WithSchema("pg_toast"), []string{"WithSchema", "PostgreSQL's own schema"}},
		{"information_schema", pgstore.WithSchema("information_schema"), []string{"WithSchema", "PostgreSQL's own schema"}},
		{"public", pgstore.WithSchema("public"), []string{"WithSchema", "PostgreSQL's own schema"}},
		{"zero value limit", pgstore.WithMaxValueBytes(0), []string{"WithMaxValueBytes", "at least 1"}},
		{"a retention of a second", pgstore.WithChangeLog(time.Second), []string{"WithChangeLog", "at least 1m"}},
		{"a nil option", nil, []string{"option 1 of 1 is nil"}},
	}
	url := pgtest.URL(t)
	pool := pgtest.Pool(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			c, err := pgstore.Connect(ctx, url, tc.opt)
			require.Error(t, err)
			require.Nil(t, c)
			for _, frag := range tc.want {
				require.ErrorContains(t, err, frag)
			}

			c, err = pgstore.New(ctx, pool, tc.opt)
			require.Error(t, err)
			require.Nil(t, c)
			for _, frag := range tc.want {
				require.ErrorContains(t, err, frag)
			}
		})
	}
}

func TestSchemaNameIsUsedExactlyAsGiven(t *testing.T) {
	t.Parallel()
	base := pgtest.Schema(t) // only for a unique suffix; this schema stays unused
	names := map[string]string{
		"63 bytes, the longest PostgreSQL keeps": base + strings.Repeat("x", 63-len(base)),
		"mixed case, spaces and quotes":          `Mixed "Case" ` + base,
	}
	for name, schema := range names {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			t.Cleanup(func() { pgtest.DropSchema(t, pgtest.URL(t), schema) })
			c := connectSchema(t, schema)
			ctx := testCtx(t)
			require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]int{"hp": 300}))
			requireRecord(t, c, "cars/bmw", 1, `{"hp": 300}`)
			require.True(t, tableExists(t, c, schema, "cars"), "table cars must be in schema %q", schema)
		})
	}
}

func TestConnectToUnreachableServerFailsFastWithoutLeakingThePassword(t *testing.T) {
	t.Parallel()
	const password = "s3cretpw"
	for _, connString := range []string{
		"postgres://u:" + password + "@127.0.0.1:1/x",
		"host=127.0.0.1 port=1 user=u dbname=x password=" + password,
	} {
		t.Run(connString[:8], func(t *testing.T) {
			t.Parallel()
			var logs bytes.Buffer
			// Generous, so that a failure by timeout (rather than by the refused
			// connection) shows as DeadlineExceeded.
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			c, err := pgstore.Connect(ctx, connString, pgstore.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
			require.Error(t, err)
			require.Nil(t, c)
			require.NotErrorIs(t, err, context.DeadlineExceeded, "Connect must fail because the server refuses, not wait for ctx")
			require.NotContains(t, err.Error(), password)
			require.NotContains(t, fmt.Sprintf("%+v", err), password)
			require.NotContains(t, logs.String(), password)
		})
	}
}

func TestConnectWithMalformedConnectionStringDoesNotLeakThePassword(t *testing.T) {
	t.Parallel()
	const password = "s3cretpw"
	for _, connString := range []string{
		"postgres://u:" + password + "@127.0.0.1:notaport/x",
		"postgres://u:" + password + "@[::1/x",
		"postgres://u:" + password + "@127.0.0.1:5432/x?sslmode=bogus",
		"postgres://u:" + password + "@127.0.0.1:5432/x?pool_max_conns=many",
		"postgres://u:" + password + "@host with space/x",
		"host=127.0.0.1 password=" + password + " port=notaport",
		"host=127.0.0.1 password='" + password + " port=5432",
		"host=127.0.0.1 password=" + password + " sslmode=bogus",
	} {
		c, err := pgstore.Connect(testCtx(t), connString)
		require.Error(t, err, connString)
		require.Nil(t, c)
		require.NotContains(t, err.Error(), password, "error for %q", connString)
		require.NotContains(t, fmt.Sprintf("%+v", err), password, "error for %q", connString)
	}
}

func TestNewRefusesANilPool(t *testing.T) {
	t.Parallel()
	c, err := pgstore.New(testCtx(t), nil)
	require.Error(t, err)
	require.ErrorContains(t, err, "nil")
	require.Nil(t, c)
}

func TestNewLeavesTheCallersPoolOpenAfterClose(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	pool := pgtest.Pool(t)
	c, err := pgstore.New(ctx, pool, pgstore.WithSchema(schema), pgstore.WithLogger(testLogger(t)))
	require.NoError(t, err)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]int{"hp": 300}))
	closeNow(t, c)

	require.NoError(t, pool.Ping(ctx), "Close must not close a pool it did not open")
	var n int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM "+ident(schema, "cars")).Scan(&n))
	require.Equal(t, 1, n)
	// The connector itself is closed all the same.
	_, err = c.Get(ctx, "cars/bmw")
	require.ErrorIs(t, err, pgstore.ErrClosed)
}

func TestAPoolOfOneConnectionIsEnough(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connectURL(t, withParam(t, pgtest.URL(t), "pool_max_conns", "1"), pgtest.Schema(t))

	var results []*pgstore.Result
	for i := range 50 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("one/%d", i), int64(i), i))
	}
	bad := c.SetAsync(ctx, "one/bad", 1, json.RawMessage(`1e1000000`)) // takes the slow path
	waitAll(t, results)
	require.ErrorIs(t, bad.Wait(ctx), pgstore.ErrInvalidValue)
	requireRecord(t, c, "one/49", 49, "49")
	require.NoError(t, c.Delete(ctx, "one/49"))
	requireNotFound(t, c, "one/49")
}

// ---- Records ----

func TestSetGetDeleteRoundTrip(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)

	require.NoError(t, c.Set(ctx, "cars/bmw", 3, map[string]any{"model": "bmw", "hp": 300}))
	requireRecord(t, c, "cars/bmw", 3, `{"model": "bmw", "hp": 300}`)

	require.NoError(t, c.Set(ctx, "cars/bmw", 4, map[string]any{"model": "bmw", "hp": 310}))
	requireRecord(t, c, "cars/bmw", 4, `{"model": "bmw", "hp": 310}`)

	require.NoError(t, c.Delete(ctx, "cars/bmw"))
	requireNotFound(t, c, "cars/bmw")
}

func TestGetOfAMissingKeyOrTableReturnsErrNotFound(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, true))

	requireNotFound(t, c, "cars/audi")
	requireNotFound(t, c, "planes/boeing")
	require.False(t, tableExists(t, c, schema, "planes"), "a read must not create a table")
}

func TestDeleteOfAMissingKeySucceeds(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, true))

	require.NoError(t, c.Delete(ctx, "cars/audi"), "missing key in an existing table")
	require.NoError(t, c.Delete(ctx, "planes/boeing"), "missing table")
	require.False(t, tableExists(t, c, schema, "planes"), "a delete must not create a table")
	requireRecord(t, c, "cars/bmw", 1, `true`)
}

func TestFirstWriteCreatesTheTableInTheSchemaWithIDVersionAndValColumns(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.False(t, tableExists(t, c, schema, "cars"))

	require.NoError(t, c.Set(ctx, "cars/bmw", 1, map[string]int{"hp": 300}))
	require.True(t, tableExists(t, c, schema, "cars"))

	rows, err := c.Query(ctx, `SELECT column_name::text, data_type::text FROM information_schema.columns
		WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position`, schema, "cars")
	require.NoError(t, err)
	cols, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var name, typ string
		err := r.Scan(&name, &typ)
		return name + " " + typ, err
	})
	require.NoError(t, err)
	require.Equal(t, []string{"id text", "version bigint", "val jsonb"}, cols)

	pk := queryInt(t, c, `SELECT count(*) FROM information_schema.table_constraints tc
		JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name)
		WHERE tc.table_schema = $1 AND tc.table_name = $2 AND tc.constraint_type = 'PRIMARY KEY' AND k.column_name = 'id'`,
		schema, "cars")
	require.EqualValues(t, 1, pk, "id must be the primary key")

	// Nothing of pgstore's lands in public (deepstream put its functions there).
	require.Zero(t, queryInt(t, c, `SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		WHERE n.nspname = 'public' AND p.proname LIKE 'pgstore%'`))
}

func TestVersionsAreSixtyFourBit(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	for _, v := range []int64{math.MaxInt32 + 1, 1 << 40, 1<<53 + 1, math.MaxInt64, math.MinInt64} {
		key := fmt.Sprintf("big/%d", v)
		require.NoError(t, c.Set(ctx, key, v, v))
		requireRecord(t, c, key, v, fmt.Sprint(v))
		stored, _, found := storedRow(t, c, schema, "big", fmt.Sprint(v))
		require.True(t, found)
		require.Equal(t, v, stored)
	}
}

// ---- Close ----

func TestCallsAfterCloseReturnErrClosedAndCloseTwiceIsFine(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c := connect(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, true))
	require.NoError(t, c.Close(ctx))
	require.NoError(t, c.Close(ctx), "a second Close returns what the first did")

	require.ErrorIs(t, c.Set(ctx, "cars/bmw", 2, true), pgstore.ErrClosed)
	require.ErrorIs(t, c.SetAsync(ctx, "cars/bmw", 2, true).Wait(ctx), pgstore.ErrClosed)
	require.ErrorIs(t, c.Delete(ctx, "cars/bmw"), pgstore.ErrClosed)
	require.ErrorIs(t, c.DeleteAsync(ctx, "cars/bmw").Wait(ctx), pgstore.ErrClosed)
	_, err := c.Get(ctx, "cars/bmw")
	require.ErrorIs(t, err, pgstore.ErrClosed)
	rows, err := c.Query(ctx, "SELECT 1")
	require.ErrorIs(t, err, pgstore.ErrClosed)
	require.Nil(t, rows)
	_, err = c.Exec(ctx, "SELECT 1")
	require.ErrorIs(t, err, pgstore.ErrClosed)
}

func TestCloseWithAnEndedContextFailsEveryUnsentWriteAsClosed(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	// Not connect(t): its cleanup would rightly complain about the error of
	// this Close.
	c, err := pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(pgtest.Schema(t)),
		pgstore.WithWriteInterval(time.Hour), pgstore.WithLogger(testLogger(t)))
	require.NoError(t, err)
	var results []*pgstore.Result
	for i := range 100 {
		results = append(results, c.SetAsync(ctx, fmt.Sprintf("late/%d", i), 1, i))
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	err = c.Close(ended)
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, err, c.Close(ctx), "Close again returns the same")

	// Nothing was sent: every write fails as closed, none as "may have
	// committed", and none is in the table.
	for _, r := range results {
		werr := r.Wait(ctx)
		require.ErrorIs(t, werr, pgstore.ErrClosed)
		require.NotErrorIs(t, werr, pgstore.ErrOutcomeUnknown)
	}
	var tables int
	require.NoError(t, pgtest.Pool(t).QueryRow(ctx,
		"SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'late'", c.Schema()).Scan(&tables))
	require.Zero(t, tables, "no batch reached the server")
}

func TestCloseWhileWritingAcceptsOrRefusesEveryWriteCleanly(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)

	type outcome struct {
		key string
		err error
	}
	const writers = 8
	outcomes := make([][]outcome, writers)
	var succeeded atomic.Int64
	enough := make(chan struct{})
	var enoughOnce sync.Once
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for i := 0; ; i++ {
				key := fmt.Sprintf("w/%d-%d", g, i)
				var err error
				if g%2 == 0 {
					err = c.Set(ctx, key, int64(i), map[string]int{"g": g, "i": i})
				} else {
					err = c.SetAsync(ctx, key, int64(i), map[string]int{"g": g, "i": i}).Wait(ctx)
				}
				outcomes[g] = append(outcomes[g], outcome{key, err})
				if err != nil {
					return
				}
				if succeeded.Add(1) == 200 {
					enoughOnce.Do(func() { close(enough) })
				}
			}
		})
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-enough:
	case <-allDone: // every writer stopped early: the checks below say why
	}
	require.NoError(t, c.Close(ctx))
	<-allDone

	after := connectSchema(t, schema)
	var stored, refused int
	for g, list := range outcomes {
		require.NotEmpty(t, list)
		for i, o := range list {
			last := i == len(list)-1
			if !last {
				require.NoError(t, o.err, "%s: only the last write of a writer fails", o.key)
				requireRecord(t, after, o.key, int64(i), jsonOf(t, map[string]int{"g": g, "i": i}))
				stored++
				continue
			}
			require.ErrorIs(t, o.err, pgstore.ErrClosed, "%s: a write during Close either succeeds or fails with ErrClosed", o.key)
			requireNotFound(t, after, o.key)
			refused++
		}
	}
	require.Equal(t, writers, refused)
	require.EqualValues(t, stored, rowCount(t, after, schema, "w"))
}

func TestATableOrSchemaDroppedBehindTheConnectorsBackIsCreatedAgain(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"))

	_, err := c.Exec(ctx, "DROP TABLE "+ident(schema, "cars"))
	require.NoError(t, err)
	requireNotFound(t, c, "cars/bmw")
	require.NoError(t, c.Delete(ctx, "cars/bmw"))
	require.NoError(t, c.Set(ctx, "cars/vw", 2, "vw"))
	requireRecord(t, c, "cars/vw", 2, `"vw"`)

	_, err = c.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
	require.NoError(t, err)
	requireNotFound(t, c, "cars/vw")
	require.NoError(t, c.Set(ctx, "cars/audi", 3, "audi"))
	require.NoError(t, c.Set(ctx, "planes/boeing", 4, "boeing"))
	requireRecord(t, c, "cars/audi", 3, `"audi"`)
	requireRecord(t, c, "planes/boeing", 4, `"boeing"`)
}

// ---- Concurrency ----

func TestConcurrentSetGetDeleteEndsConsistent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t, pgstore.WithMaxBatchSize(7))

	const workers, ops, keysEach = 16, 150, 4
	type state struct {
		deleted bool
		version int64
		value   json.RawMessage
	}
	final := make([]map[string]state, workers) // by goroutine, by key
	var wg sync.WaitGroup
	for g := range workers {
		wg.Go(func() {
			mine := make(map[string]state)
			var pending []*pgstore.Result
			defer func() {
				for _, r := range pending {
					assert.NoError(t, r.Wait(ctx))
				}
				final[g] = mine
			}()
			for i := range ops {
				key := fmt.Sprintf("conc/g%d-k%d", g, (i*7+g)%keysEach)
				value := json.RawMessage(fmt.Sprintf(`{"g": %d, "i": %d}`, g, i)) // jsonOf would require off the test's goroutine
				switch (i + g) % 5 {
				case 0:
					if !assert.NoError(t, c.Set(ctx, key, int64(i), value)) {
						return
					}
					mine[key] = state{version: int64(i), value: value}
				case 1:
					pending = append(pending, c.SetAsync(ctx, key, int64(i), value))
					mine[key] = state{version: int64(i), value: value}
				case 2:
					if !assert.NoError(t, c.Delete(ctx, key)) {
						return
					}
					mine[key] = state{deleted: true}
				case 3:
					pending = append(pending, c.DeleteAsync(ctx, key))
					mine[key] = state{deleted: true}
				case 4:
					// Read-your-writes, while everyone else writes too.
					want, written := mine[key]
					rec, err := c.Get(ctx, key)
					if !written || want.deleted {
						assert.ErrorIs(t, err, pgstore.ErrNotFound, key)
					} else if assert.NoError(t, err, key) {
						assert.Equal(t, want.version, rec.Version, key)
						assert.JSONEq(t, string(want.value), string(rec.Value), key)
					}
				}

				// The hot key, hammered by everyone: a read must never mix
				// one write's version with another's value.
				hot := int64(g*1_000_000 + i)
				switch i % 3 {
				case 0:
					assert.NoError(t, c.Set(ctx, "conc/hot", hot, map[string]int64{"v": hot}))
				case 1:
					assert.NoError(t, c.Delete(ctx, "conc/hot"))
				case 2:
					rec, err := c.Get(ctx, "conc/hot")
					if err == nil {
						assert.JSONEq(t, jsonOf(t, map[string]int64{"v": rec.Version}), string(rec.Value))
					} else {
						assert.ErrorIs(t, err, pgstore.ErrNotFound)
					}
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	check := func(c *pgstore.Connector) {
		t.Helper()
		var live int64
		for g := range workers {
			for k := range keysEach {
				key := fmt.Sprintf("conc/g%d-k%d", g, k)
				want, written := final[g][key]
				if !written || want.deleted {
					requireNotFound(t, c, key)
					continue
				}
				requireRecord(t, c, key, want.version, string(want.value))
				live++
			}
		}
		var hot int64
		if _, err := c.Get(ctx, "conc/hot"); err == nil {
			hot = 1
		}
		require.Equal(t, live+hot, rowCount(t, c, schema, "conc"))
	}
	check(c)
	hotBefore, hotErr := c.Get(ctx, "conc/hot")
	closeNow(t, c)

	// What the connector showed is what the database holds.
	after := connectSchema(t, schema)
	check(after)
	hotAfter, err := after.Get(ctx, "conc/hot")
	if hotErr != nil {
		require.ErrorIs(t, err, pgstore.ErrNotFound)
	} else {
		require.NoError(t, err)
		require.Equal(t, hotBefore.Version, hotAfter.Version)
	}
}

func TestTwoConnectorsCreateTheSameTableAtTheSameMoment(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	a := connectSchema(t, schema)
	b := connectSchema(t, schema)

	const tables = 5
	start := make(chan struct{})
	errs := make(chan error, 2*tables)
	var wg sync.WaitGroup
	for i := range tables {
		for name, c := range map[string]*pgstore.Connector{"a": a, "b": b} {
			wg.Go(func() {
				<-start
				errs <- c.Set(ctx, fmt.Sprintf("shared%d/from-%s", i, name), int64(i), map[string]string{"by": name})
			})
		}
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}

	for i := range tables {
		table := fmt.Sprintf("shared%d", i)
		require.True(t, tableExists(t, a, schema, table))
		require.EqualValues(t, 2, rowCount(t, a, schema, table))
		// Each reads the other's write.
		requireRecord(t, a, table+"/from-b", int64(i), `{"by": "b"}`)
		requireRecord(t, b, table+"/from-a", int64(i), `{"by": "a"}`)
	}
}

// ---- Table policy ----

var errNoSecrets = errors.New("no secret tables here")

func TestTablePolicyRefusesATableWithItsOwnError(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	var mu sync.Mutex
	asked := map[string]int{}
	policy := func(table string) error {
		mu.Lock()
		defer mu.Unlock()
		asked[table]++
		if table == "secret" {
			return errNoSecrets
		}
		return nil
	}
	c, schema := connectNamed(t, pgstore.WithTablePolicy(policy))

	err := c.Set(ctx, "secret/plans", 1, "world domination")
	require.ErrorIs(t, err, errNoSecrets)
	require.ErrorContains(t, err, "secret")
	require.ErrorIs(t, c.SetAsync(ctx, "secret/plans", 1, "world domination").Wait(ctx), errNoSecrets)
	require.False(t, tableExists(t, c, schema, "secret"), "a refused table must not be created")
	requireNotFound(t, c, "secret/plans")

	// An accepted table is asked about once, however it is used after.
	for i := range 5 {
		require.NoError(t, c.Set(ctx, fmt.Sprintf("open/%d", i), int64(i), i))
	}
	waitAll(t, []*pgstore.Result{c.SetAsync(ctx, "open/async", 1, 1), c.DeleteAsync(ctx, "open/0")})
	require.NoError(t, c.Delete(ctx, "open/1"))
	requireRecord(t, c, "open/2", 2, "2")

	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, 1, asked["open"], "the policy is asked once per accepted table")
	require.GreaterOrEqual(t, asked["secret"], 1)
}

func TestTablePolicyIsAskedOnceEvenWhenManyWritersStartATableTogether(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	var calls atomic.Int64
	second := make(chan struct{})
	policy := func(table string) error {
		switch calls.Add(1) {
		case 1:
			// Keep the first decision pending a moment, so that writers
			// racing to the same new table would ask again meanwhile.
			select {
			case <-second:
			case <-time.After(200 * time.Millisecond):
			}
		case 2:
			close(second)
		}
		return nil
	}
	c := connect(t, pgstore.WithTablePolicy(policy))

	const writers = 16
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range writers {
		wg.Go(func() {
			<-start
			assert.NoError(t, c.Set(ctx, fmt.Sprintf("quota/%d", i), 1, i))
		})
	}
	close(start)
	wg.Wait()
	require.EqualValues(t, 1, calls.Load(), "the policy was asked %d times about one table", calls.Load())
}

// ---- Failures from the server ----

func TestAWriteTheServerRefusesReportsTheServersReason(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, schema := connectNamed(t)
	createRefusingTable(t, c, schema, "guarded")

	err := c.Set(ctx, "guarded/x", 1, map[string]int{"a": 1})
	require.Error(t, err)
	require.ErrorContains(t, err, "refused by test")
	require.Zero(t, rowCount(t, c, schema, "guarded"))
	requireNotFound(t, c, "guarded/x")
}

func TestATableTheServerRefusesDoesNotFailOtherTablesOfTheBatch(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	createRefusingTable(t, setup, schema, "guarded")

	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	bad := c.SetAsync(ctx, "guarded/x", 1, map[string]int{"a": 1})
	good := []*pgstore.Result{c.SetAsync(ctx, "fine/y", 1, "y"), c.SetAsync(ctx, "fine/z", 2, "z")}
	closeNow(t, c)

	require.ErrorContains(t, bad.Wait(ctx), "refused by test")
	waitAll(t, good)
	requireRecord(t, setup, "fine/y", 1, `"y"`)
	requireRecord(t, setup, "fine/z", 2, `"z"`)
	require.Zero(t, rowCount(t, setup, schema, "guarded"))
}

// createRefusingTable makes, by hand, a record table whose trigger refuses
// every insert.
func createRefusingTable(t *testing.T, c *pgstore.Connector, schema, table string) {
	t.Helper()
	ctx := testCtx(t)
	for _, stmt := range []string{
		"CREATE TABLE " + ident(schema, table) + " (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL)",
		"CREATE FUNCTION " + ident(schema, "refuse") + "() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'refused by test'; END$$",
		"CREATE TRIGGER refuse BEFORE INSERT ON " + ident(schema, table) + " FOR EACH ROW EXECUTE FUNCTION " + ident(schema, "refuse") + "()",
	} {
		_, err := c.Exec(ctx, stmt)
		require.NoError(t, err, stmt)
	}
}

func TestAConstraintViolationFailsOnlyTheRecordsItRefuses(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t)
	setup := connectSchema(t, schema)
	_, err := setup.Exec(ctx, "CREATE TABLE "+ident(schema, "checked")+
		" (id text PRIMARY KEY, version bigint NOT NULL, val jsonb NOT NULL CONSTRAINT val_has_name CHECK (val ? 'name'))")
	require.NoError(t, err)

	c := connectSchema(t, schema, pgstore.WithWriteInterval(time.Hour))
	var good []*pgstore.Result
	for i := range 6 {
		good = append(good, c.SetAsync(ctx, fmt.Sprintf("checked/good%d", i), int64(i), map[string]int{"name": i}))
	}
	bad := c.SetAsync(ctx, "checked/bad", 1, map[string]int{"nameless": 1})
	closeNow(t, c)

	err = bad.Wait(ctx)
	require.ErrorIs(t, err, pgstore.ErrInvalidValue)
	require.ErrorContains(t, err, "val_has_name")
	waitAll(t, good)
	require.EqualValues(t, 6, rowCount(t, setup, schema, "checked"))
	requireNotFound(t, setup, "checked/bad")
}

// failingPool is a caller's pool whose connections cannot be acquired while
// failing is set, as when the server is unreachable.
type failingPool struct {
	pool    *pgxpool.Pool
	failing atomic.Bool
	calls   atomic.Int64 // acquisitions refused
	// After this many refusals the failure passes by itself; 0 for never.
	passAfter atomic.Int64
}

var errServerGone = errors.New("test: server unreachable")

func newFailingPool(t *testing.T) *failingPool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	fp := &failingPool{}
	cfg.PrepareConn = func(context.Context, *pgx.Conn) (bool, error) {
		if !fp.failing.Load() {
			return true, nil
		}
		n := fp.calls.Add(1)
		if limit := fp.passAfter.Load(); limit > 0 && n >= limit {
			fp.failing.Store(false)
		}
		return true, errServerGone
	}
	fp.pool, err = pgxpool.NewWithConfig(testCtx(t), cfg)
	require.NoError(t, err)
	t.Cleanup(fp.pool.Close)
	return fp
}

func newOnPool(t *testing.T, pool *pgxpool.Pool, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	opts = append([]pgstore.Option{pgstore.WithSchema(pgtest.Schema(t)), pgstore.WithLogger(testLogger(t))}, opts...)
	c, err := pgstore.New(testCtx(t), pool, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, c.Close(context.Background())) })
	return c
}

func TestAWriteFailsWithTheCauseOnceTheRetryTimeoutIsSpent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	fp := newFailingPool(t)
	c := newOnPool(t, fp.pool, pgstore.WithRetryTimeout(200*time.Millisecond))

	fp.failing.Store(true)
	err := c.Set(ctx, "r/x", 1, "lost?")
	fp.failing.Store(false)
	require.ErrorIs(t, err, errServerGone)
	require.GreaterOrEqual(t, fp.calls.Load(), int64(2), "the write must be retried before it fails")
	requireNotFound(t, c, "r/x")

	// The connector works again once the server is back.
	require.NoError(t, c.Set(ctx, "r/x", 2, "back"))
	requireRecord(t, c, "r/x", 2, `"back"`)
}

func TestAWriteIsRetriedUntilAPassingFailureHasPassed(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	fp := newFailingPool(t)
	c := newOnPool(t, fp.pool, pgstore.WithRetryTimeout(20*time.Second))

	fp.passAfter.Store(3)
	fp.failing.Store(true)
	require.NoError(t, c.Set(ctx, "r/x", 1, "made it"))
	require.EqualValues(t, 3, fp.calls.Load(), "the write went through only after the failures passed")
	requireRecord(t, c, "r/x", 1, `"made it"`)
}

func TestAHangingConnectionFailsTheWriteAfterTheRetryTimeout(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	proxy, url := pgtest.NewProxy(t)
	schema := pgtest.Schema(t)
	c, err := pgstore.Connect(ctx, url, pgstore.WithSchema(schema), pgstore.WithRetryTimeout(time.Second))
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Restore(); _ = c.Close(context.Background()) })
	require.NoError(t, c.Set(ctx, "t/before", 1, 1))

	// The network silently stops: no error, no answer.
	proxy.Freeze()
	err = c.Set(ctx, "t/hung", 1, 1)
	require.ErrorIs(t, err, context.DeadlineExceeded, "the attempt is bounded, not left hanging")
	proxy.Restore()
	require.NoError(t, c.Set(ctx, "t/after", 1, 1))
}

func TestCloseDoesNotWaitPastItsContextForConnectionsInUse(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	c, err := pgstore.Connect(ctx, pgtest.URL(t), pgstore.WithSchema(pgtest.Schema(t)))
	require.NoError(t, err)
	rows, err := c.Query(ctx, "SELECT 1") // never closed before Close
	require.NoError(t, err)

	closeCtx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	err = c.Close(closeCtx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "connections still in use")
	rows.Close() // the pool then closes (goleak checks its goroutine ends)
}

func TestConnectedSessionsNameThemselvesPgstoreUnlessTheConnectionStringSays(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	name := func(c *pgstore.Connector) string {
		t.Helper()
		rows, err := c.Query(ctx, "SELECT current_setting('application_name')")
		require.NoError(t, err)
		got, err := pgx.CollectExactlyOneRow(rows, pgx.RowTo[string])
		require.NoError(t, err)
		return got
	}
	require.Equal(t, pgstore.DefaultApplicationName, name(connect(t)))

	require.Equal(t, "node-7", name(connectURL(t, withParam(t, pgtest.URL(t), "application_name", "node-7"), pgtest.Schema(t))))
}

func TestATablePolicyThatWritesToANewTableIsToldSoInsteadOfWaitingForItself(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	var c *pgstore.Connector
	var fromPolicy error
	c = connect(t, pgstore.WithTablePolicy(func(table string) error {
		if table == "cars" {
			fromPolicy = c.Set(ctx, "audit/"+table, 1, "created")                            // a new table, from inside the policy
			if _, err := c.Get(ctx, "cars/anything"); !errors.Is(err, pgstore.ErrNotFound) { // reads are fine
				return err
			}
			return nil
		}
		return nil
	}))
	require.NoError(t, c.Set(ctx, "cars/bmw", 1, "bmw"), "the policy's own write failing does not refuse the table")
	require.ErrorContains(t, fromPolicy, "the table policy may not write to a table the connector has not written to yet")
	require.NoError(t, c.Set(ctx, "audit/x", 1, "x"), "outside the policy, the table is asked about as usual")
}

// The LISTEN connection is a connection of its own, beyond the pool's limit,
// as the README and Stats say: with pool_max_conns=2 a subscribing connector
// whose pool is in full use holds three sessions.
func TestTheListenConnectionIsOneBeyondPoolMaxConns(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	schema := pgtest.Schema(t) // also the application_name of its sessions: unique to the test
	c := connectURL(t, withParam(t, withParam(t, pgtest.URL(t), "pool_max_conns", "2"), "application_name", schema), schema)
	sub, err := c.Subscribe(ctx, func(pgstore.Event) {})
	require.NoError(t, err)
	defer sub.Close(ctx)
	for range 2 { // both pooled connections, held by open results
		rows, err := c.Query(ctx, "SELECT 1")
		require.NoError(t, err)
		defer rows.Close()
	}
	var sessions int
	require.NoError(t, pgtest.Pool(t).QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", schema).Scan(&sessions))
	require.Equal(t, 3, sessions, "two pooled, and the LISTEN connection")
	require.True(t, c.Stats().Listener.Listening)
}
