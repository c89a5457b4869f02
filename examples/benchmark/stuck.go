package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// stuckFigure measures figure 7: one-row Sets (write interval 0, fresh keys,
// the change log on) while a repeatable-read transaction elsewhere holds its
// snapshot open, as a pg_dump or a session idle in a transaction does.
// Nothing written meanwhile can be cleaned up: a row that every write
// updated would make each write slower than the last. The figure compares
// the latency of the last tenth of the writes with that of the first.
func stuckFigure(ctx context.Context, e *env) error {
	const figure, table = "stuck", "stuck"
	var c *store
	err := labelled(ctx, figure, "pgstore", func(ctx context.Context) (err error) {
		c, err = e.connect(ctx, e.logged, pgstore.WithChangeLog(logRetention), pgstore.WithWriteInterval(0))
		return err
	})
	if err != nil {
		return err
	}
	defer c.close()
	val := benchkit.AppendValue(nil, 0, 1, e.s.valueBytes)
	if err := c.Set(ctx, table+"/warm", 0, val); err != nil {
		return err
	}
	snapshot, err := e.raw.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return err
	}
	defer snapshot.Rollback(context.Background()) //nolint:errcheck // it only held a snapshot
	if _, err := snapshot.Exec(ctx, "SELECT 1"); err != nil {
		return err
	}
	n := e.s.stuckWrites
	took := make([]time.Duration, 0, n)
	err = labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
		for i := range n {
			start := time.Now()
			if err := c.Set(ctx, fmt.Sprintf("%s/k%d", table, i), 1, val); err != nil {
				return err
			}
			took = append(took, time.Since(start))
		}
		return nil
	})
	if err != nil {
		return err
	}
	tenth := n / 10
	first, _ := benchkit.Percentiles(took[:tenth])
	last, _ := benchkit.Percentiles(took[n-tenth:])
	progress("%s: Set p50 %v over the first tenth of %d writes, %v over the last", figure, first, n, last)
	e.rep.Set("stuck_set_p50", benchkit.Micros(last), benchkit.Micros(first))
	e.rep.Note("stuck_set_p50: %d one-row Sets of fresh keys (write interval 0, change log on) while a repeatable-read transaction holds its snapshot; "+
		"pgstore = p50 of the last tenth, ceiling = p50 of the first tenth (1 = as fast at the end as at the start)", n)
	return nil
}
