package main

import (
	"context"
	"time"
)

// pollUntil calls check every interval until it reports done or an error,
// or timeout passes; then it returns onTimeout. The hooks' waits share it.
func pollUntil(ctx context.Context, timeout, every time.Duration, onTimeout error, check func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if done, err := check(ctx); done || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return onTimeout
		case <-t.C:
		}
	}
}
