package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"
)

func cleanupWaitCommand(fs *flag.FlagSet) func(context.Context) error {
	var ns, name string
	var timeout, every time.Duration
	fs.StringVar(&ns, "namespace", "", "namespace of the cleanup DaemonSet (required)")
	fs.StringVar(&name, "daemonset", "", "name of the cleanup DaemonSet (required)")
	fs.DurationVar(&timeout, "timeout", 9*time.Minute, "give up after this long")
	fs.DurationVar(&every, "interval", 2*time.Second, "how often to look")
	return func(ctx context.Context) error {
		if ns == "" || name == "" {
			return errors.New("--namespace and --daemonset are required")
		}
		cfg, err := ctrl.GetConfig()
		if err != nil {
			return fmt.Errorf("kubeconfig: %w", err)
		}
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return err
		}
		onTimeout := fmt.Errorf("cleanup did not finish on every node in %s: see the pods of DaemonSet %s/%s", timeout, ns, name)
		err = wait.PollUntilContextTimeout(ctx, every, timeout, true, func(ctx context.Context) (bool, error) {
			ds, err := cs.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
				return false, fmt.Errorf("DaemonSet %s/%s is gone: nothing to wait for, was the hook deleted?", ns, name)
			case err != nil:
				slog.Warn("reading cleanup DaemonSet", "err", err)
			case cleanedUp(ds):
				slog.Info("node mirror configuration restored", "nodes", ds.Status.DesiredNumberScheduled)
				return true, nil
			default:
				slog.Info("waiting for node cleanup", "ready", ds.Status.NumberReady, "nodes", ds.Status.DesiredNumberScheduled)
			}
			return false, nil
		})
		if wait.Interrupted(err) {
			return onTimeout
		}
		return err
	}
}

// cleanedUp: a pod turns ready only after its init container restored the
// node, so every scheduled pod ready means every node is clean.
func cleanedUp(ds *appsv1.DaemonSet) bool {
	st := ds.Status
	return st.ObservedGeneration >= ds.Generation && st.NumberReady >= st.DesiredNumberScheduled
}
