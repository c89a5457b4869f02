package pgstore_test

import (
	"context"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

type spanKey struct{}

// flushTracer records flushes, and marks the context of each with a span.
type flushTracer struct {
	mu     sync.Mutex
	starts []pgstore.TraceFlushStartData
	ends   []pgstore.TraceFlushEndData
	open   int
}

func (f *flushTracer) TraceFlushStart(ctx context.Context, d pgstore.TraceFlushStartData) context.Context {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.starts = append(f.starts, d)
	f.open++
	return context.WithValue(ctx, spanKey{}, len(f.starts))
}

func (f *flushTracer) TraceFlushEnd(ctx context.Context, d pgstore.TraceFlushEndData) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ends = append(f.ends, d)
	f.open--
}

// spanQueries is a pgx tracer that notes the span of each query's context.
type spanQueries struct {
	mu    sync.Mutex
	spans map[int]int // span → queries
}

func (s *spanQueries) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	if span, ok := ctx.Value(spanKey{}).(int); ok {
		s.mu.Lock()
		s.spans[span]++
		s.mu.Unlock()
	}
	return ctx
}

func (s *spanQueries) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (s *spanQueries) TraceBatchStart(ctx context.Context, conn *pgx.Conn, d pgx.TraceBatchStartData) context.Context {
	return s.TraceQueryStart(ctx, conn, pgx.TraceQueryStartData{})
}
func (s *spanQueries) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (s *spanQueries) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

func TestATracerSeesEachFlushAndItsQueriesRunUnderItsContext(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	require.NoError(t, err)
	queries := &spanQueries{spans: make(map[int]int)}
	cfg.ConnConfig.Tracer = queries
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	tracer := &flushTracer{}
	schema := pgtest.Schema(t)
	c, err := pgstore.New(ctx, pool, pgstore.WithSchema(schema), pgstore.WithTracer(tracer), pgstore.WithVersionGuard(true))
	require.NoError(t, err)
	defer c.Close(ctx)

	require.NoError(t, c.Set(ctx, "t/a", 2, "a"))
	require.NoError(t, c.Set(ctx, "t/a", 3, "b"))
	_, err = pool.Exec(ctx, "UPDATE "+pgx.Identifier{schema, "t"}.Sanitize()+" SET version = 10")
	require.NoError(t, err)
	require.ErrorIs(t, c.Set(ctx, "t/a", 4, "stale by then"), pgstore.ErrVersionConflict)

	tracer.mu.Lock()
	defer tracer.mu.Unlock()
	require.Zero(t, tracer.open, "every start has its end")
	require.Equal(t, []pgstore.TraceFlushStartData{{schema, 1}, {schema, 1}, {schema, 1}}, tracer.starts)
	require.Len(t, tracer.ends, 3)
	require.Equal(t, 1, tracer.ends[0].Durable)
	require.Equal(t, 1, tracer.ends[2].Failed)
	require.ErrorIs(t, tracer.ends[2].Err, pgstore.ErrVersionConflict)
	queries.mu.Lock()
	defer queries.mu.Unlock()
	for span := 1; span <= 3; span++ {
		require.Positive(t, queries.spans[span], "flush %d's statements ran under the context TraceFlushStart returned", span)
	}
}
