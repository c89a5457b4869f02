// Command check verifies, before going live, that pgstore can work on a
// server: the grants it needs, the ownership of its tables, and that
// LISTEN/NOTIFY round-trips (it does not through a transaction-pooling
// bouncer). It changes nothing on the server.
//
//	go run ./examples/check [-url URL] [-schema ds]
//
// The URL is the -url flag, else $DATABASE_URL, else the local default. It
// prints the report, with the statement that fixes each failed check, and
// exits with 1 when a check failed, 2 when the checks could not run.
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/pgstore/pgstore"
)

const defaultURL = "postgres://postgres@127.0.0.1:5432/test"

func main() {
	url := flag.String("url", "", "connection string (default: $DATABASE_URL, else "+defaultURL+")")
	schema := flag.String("schema", pgstore.DefaultSchema, "pgstore's schema")
	flag.Parse()
	*url = cmp.Or(*url, os.Getenv("DATABASE_URL"), defaultURL)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()

	// pgstore.Check rather than Connect and Connector.Check: Connect would
	// create the schema, and fails where a grant is missing.
	report, err := pgstore.Check(ctx, *url, pgstore.WithSchema(*schema))
	if err != nil {
		fmt.Fprintln(os.Stderr, "check:", err)
		os.Exit(2)
	}
	fmt.Print(report)
	if !report.OK() {
		os.Exit(1)
	}
}
