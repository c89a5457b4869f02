// Quickstart writes, reads and deletes a record with pgstore, printing each
// step. It connects to DATABASE_URL, or to the local default server.
//
//	go run ./examples/quickstart
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/pgstore/pgstore"
)

const localURL = "postgres://postgres@127.0.0.1:5432/test"

func main() {
	url := cmp.Or(os.Getenv("DATABASE_URL"), localURL)
	if err := run(context.Background(), url); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	// A schema of the example's own, dropped at the end.
	store, err := pgstore.Connect(ctx, url, pgstore.WithSchema("pgstore_quickstart"))
	if err != nil {
		return err
	}
	defer func() {
		if err := store.DestroySchema(ctx, "pgstore_quickstart"); err != nil {
			log.Print(err)
		}
		if err := store.Close(ctx); err != nil {
			log.Print(err)
		}
	}()
	fmt.Println("connected; records go to schema pgstore_quickstart")

	changes := make(chan pgstore.Event, 16)
	sub, err := store.Subscribe(ctx, func(e pgstore.Event) { changes <- e }, pgstore.ForTables("cars"))
	if err != nil {
		return err
	}
	defer sub.Close(ctx)

	car := map[string]any{"make": "BMW", "model": "i4", "hp": 340}
	if err := store.Set(ctx, "cars/bmw", 1, car); err != nil {
		return err
	}
	fmt.Println("set    cars/bmw version 1:", car)

	rec, err := store.Get(ctx, "cars/bmw")
	if err != nil {
		return err
	}
	fmt.Printf("get    cars/bmw version %d: %s\n", rec.Version, rec.Value)

	if err := store.Delete(ctx, "cars/bmw"); err != nil {
		return err
	}
	fmt.Println("delete cars/bmw")

	if _, err := store.Get(ctx, "cars/bmw"); errors.Is(err, pgstore.ErrNotFound) {
		fmt.Println("get    cars/bmw: not found, as expected")
	} else {
		return fmt.Errorf("record still there after delete: %v", err)
	}

	// The change feed saw all of it (table created, inserted, deleted).
	for range 3 {
		select {
		case e := <-changes:
			if e.Key == "" {
				fmt.Printf("event  %-12s %s\n", e.Type, e.Table)
			} else {
				fmt.Printf("event  %-12s %s version %d\n", e.Type, e.Key, e.Version)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}

	// What an operator's metrics would show (see Stats).
	st := store.Stats()
	fmt.Printf("stats  %d flushes, %d durable writes, %d failed; listening: %v; %d events delivered\n",
		st.Flushes, st.DurableWrites, st.FailedWrites.Refused+st.FailedWrites.TimedOut+st.FailedWrites.Unknown+st.FailedWrites.Closed,
		st.Listener.Listening, st.EventsDelivered)
	return nil
}
