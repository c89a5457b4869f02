package pgstore

import (
	"context"
	"errors"
)

// A Tracer observes the connector's flushes, as pgx's tracers (such as
// pgx.QueryTracer) observe queries. TraceFlushStart may return a context
// derived from ctx that carries a span: the flush's statements run under it,
// so a pgx tracer set on the pool's ConnConfig (otelpgx, for one) records them
// as its children. pgstore itself depends on no tracing library.
//
// Both methods are called on the connector's flushing goroutine and must not
// block. Deliveries to a subscription are the handler's own calls: wrap the
// handler to trace them (see the example).
type Tracer interface {
	TraceFlushStart(ctx context.Context, data TraceFlushStartData) context.Context
	TraceFlushEnd(ctx context.Context, data TraceFlushEndData)
}

// TraceFlushStartData describes a flush about to start.
type TraceFlushStartData struct {
	Schema string
	Writes int // the batch's writes, one per key
}

// TraceFlushEndData describes a flush once every write of its batch has its
// outcome, after retries and the resolution of a lost answer.
type TraceFlushEndData struct {
	Durable, Failed int
	Err             error // one failed write's error, if any failed
}

// WithTracer sets a Tracer of the connector's flushes.
func WithTracer(t Tracer) Option {
	return func(c *config) error {
		if t == nil {
			return errors.New("WithTracer: tracer is nil")
		}
		c.tracer = t
		return nil
	}
}

// observeFlushes adapts a Tracer to the write buffer's hook.
func observeFlushes(t Tracer, schema string) func(context.Context, int) (context.Context, func(int, int, error)) {
	if t == nil {
		return nil
	}
	return func(ctx context.Context, writes int) (context.Context, func(int, int, error)) {
		ctx = t.TraceFlushStart(ctx, TraceFlushStartData{Schema: schema, Writes: writes})
		return ctx, func(durable, failed int, err error) {
			t.TraceFlushEnd(ctx, TraceFlushEndData{Durable: durable, Failed: failed, Err: err})
		}
	}
}
