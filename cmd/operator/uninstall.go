package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	ctrl "sigs.k8s.io/controller-runtime"
)

var spegels = schema.GroupVersionResource{Group: "charts.fleetmirror.dev", Version: "v1alpha1", Resource: "spegels"}

// uninstallCommand is the operator chart's pre-delete hook: `helm
// uninstall` would otherwise delete the operator together with the Spegel
// resources, leaving their finalizers (and the agents on the nodes) with
// nobody to act on them. While the operator still runs, it deletes every
// Spegel resource and waits until the operator has uninstalled each
// release, node cleanup included, and dropped its finalizer.
func uninstallCommand(fs *flag.FlagSet) func(context.Context) error {
	var timeout, every time.Duration
	fs.DurationVar(&timeout, "timeout", 9*time.Minute, "give up after this long")
	fs.DurationVar(&every, "interval", 2*time.Second, "how often to look")
	return func(ctx context.Context) error {
		cfg, err := ctrl.GetConfig()
		if err != nil {
			return fmt.Errorf("kubeconfig: %w", err)
		}
		dyn, err := dynamic.NewForConfig(cfg)
		if err != nil {
			return err
		}
		onTimeout := fmt.Errorf("Spegel resources still there after %s: see their status conditions and the operator's log", timeout)
		return pollUntil(ctx, timeout, every, onTimeout, func(ctx context.Context) (bool, error) {
			list, err := dyn.Resource(spegels).List(ctx, metav1.ListOptions{})
			switch {
			case apierrors.IsNotFound(err):
				slog.Info("no Spegel CRD: nothing to remove")
				return true, nil
			case err != nil:
				slog.Warn("listing Spegel resources", "err", err)
				return false, nil
			case len(list.Items) == 0:
				slog.Info("every Spegel resource is gone; node mirror configuration restored")
				return true, nil
			}
			var left []string
			for _, s := range list.Items {
				left = append(left, s.GetNamespace()+"/"+s.GetName())
				if s.GetDeletionTimestamp() != nil {
					continue
				}
				err := dyn.Resource(spegels).Namespace(s.GetNamespace()).Delete(ctx, s.GetName(), metav1.DeleteOptions{})
				if err != nil && !apierrors.IsNotFound(err) {
					slog.Warn("deleting Spegel resource", "resource", s.GetNamespace()+"/"+s.GetName(), "err", err)
				}
			}
			slog.Info("waiting for the operator to uninstall", "resources", strings.Join(left, ", "))
			return false, nil
		})
	}
}
