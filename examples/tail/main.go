// Tail prints the change feed of a pgstore schema as it happens, one line per
// event, for people operating a cluster of realtime servers.
//
//	go run ./examples/tail -schema ds
//	go run ./examples/tail -schema ds -from CURSOR   # with a change log: from a position
//
// With a change log (pgstore's default; see pgstore.WithChangeLog), each
// line ends with the event's cursor, which -from takes to print what came
// after it. Like any connector, tail follows what the schema records, and
// gives a schema that records no choice a change log.
//
// It connects to -url, DATABASE_URL or the local default server, in that
// order, and stops on Ctrl-C.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"time"

	"github.com/pgstore/pgstore"
)

func main() {
	// Not $DATABASE_URL as the flag's default: -h would print its password.
	url := flag.String("url", "", "PostgreSQL connection string (default $DATABASE_URL, else the local server)")
	schema := flag.String("schema", pgstore.DefaultSchema, "schema whose changes to print")
	from := flag.String("from", "", "with a change log: print the changes after this cursor (from a line printed before)")
	flag.Parse()
	*url = cmp.Or(*url, os.Getenv("DATABASE_URL"), "postgres://postgres@127.0.0.1:5432/test")

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := tail(ctx, *url, *schema, *from); err != nil {
		log.Fatal(err)
	}
}

func tail(ctx context.Context, url, schema, from string) error {
	// Without WithEvents the connector leaves the schema's triggers as its
	// writers configured them.
	store, err := pgstore.Connect(ctx, url, pgstore.WithSchema(schema))
	if err != nil {
		return err
	}
	defer store.Close(context.Background())
	var filters []pgstore.Filter
	if from != "" {
		filters = append(filters, pgstore.After(from))
	}
	sub, err := store.Subscribe(ctx, func(e pgstore.Event) { fmt.Println(format(time.Now(), e)) }, filters...)
	if err != nil {
		return err
	}
	defer sub.Close(context.Background())
	fmt.Fprintf(os.Stderr, "listening to schema %q; Ctrl-C to stop\n", schema)
	<-ctx.Done()
	return nil
}

// format renders an event as one line: time, type, then what it is about,
// and with a change log, its cursor.
func format(now time.Time, e pgstore.Event) string {
	stamp := now.Format("15:04:05.000")
	var line string
	switch e.Type {
	case pgstore.CreateTable, pgstore.DestroyTable:
		line = fmt.Sprintf("%s %-13s %q", stamp, e.Type, e.Table)
	case pgstore.Resync:
		why := "events may have been missed"
		if e.Reason != nil {
			why = e.Reason.Error()
		}
		line = fmt.Sprintf("%s %-13s %s", stamp, e.Type, why)
	default:
		line = fmt.Sprintf("%s %-13s %q version %d", stamp, e.Type, e.Key, e.Version)
	}
	if e.Cursor != "" {
		line += " @" + e.Cursor
	}
	return line
}
