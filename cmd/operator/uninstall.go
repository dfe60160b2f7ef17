package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/fleetmirror/fleetmirror/operator/crd"
	"github.com/fleetmirror/fleetmirror/operator/manager"
)

var spegels = crd.Resource

// uninstallCommand is the operator chart's pre-delete hook: `helm
// uninstall` would otherwise delete the operator together with the Spegel
// resources, leaving their finalizers (and the agents on the nodes) with
// nobody to act on them. While the operator still runs, it deletes every
// Spegel resource and waits until the operator has uninstalled each
// release, node cleanup included, and dropped its finalizer.
//
// Then, with --operator-deployment, it stops the operator and deletes its
// leader lease. Helm deletes the operator's account and RBAC together with
// its Deployment, so an operator still shutting down could not release
// the lease; the next install would wait out the lease (15s) before it
// did anything, and the Lease would stay behind.
func uninstallCommand(fs *flag.FlagSet) func(context.Context) error {
	var timeout, every time.Duration
	var namespace, deployment, lease string
	fs.DurationVar(&timeout, "timeout", 9*time.Minute, "give up after this long")
	fs.DurationVar(&every, "interval", time.Second, "how often to look")
	fs.StringVar(&namespace, "namespace", "", "the operator's namespace (for --operator-deployment)")
	fs.StringVar(&deployment, "operator-deployment", "", "once every Spegel resource is gone, scale this Deployment to 0, wait for its pods to end and delete the leader lease")
	fs.StringVar(&lease, "lease", manager.LeaderElectionID, "the operator's leader lease, in --namespace")
	return func(ctx context.Context) error {
		if deployment != "" && namespace == "" {
			return errors.New("--operator-deployment needs --namespace")
		}
		cfg, err := ctrl.GetConfig()
		if err != nil {
			return fmt.Errorf("kubeconfig: %w", err)
		}
		dyn, err := dynamic.NewForConfig(cfg)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		if err := removeSpegels(ctx, dyn, timeout, every); err != nil {
			return err
		}
		if deployment == "" {
			return nil
		}
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return err
		}
		return stopOperator(ctx, cs, namespace, deployment, lease, timeout, every)
	}
}

// removeSpegels deletes every Spegel resource and waits until all are gone.
func removeSpegels(ctx context.Context, dyn dynamic.Interface, timeout, every time.Duration) error {
	onTimeout := fmt.Errorf("Spegel resources still there after %s: see their status conditions and the operator's log", timeout)
	err := wait.PollUntilContextTimeout(ctx, every, timeout, true, func(ctx context.Context) (bool, error) {
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
	if wait.Interrupted(err) {
		return onTimeout
	}
	return err
}

// stopOperator scales the operator to 0 while its account still exists,
// so it shuts down cleanly, then deletes its leader lease.
func stopOperator(ctx context.Context, cs kubernetes.Interface, ns, name, lease string, timeout, every time.Duration) error {
	deps := cs.AppsV1().Deployments(ns)
	d, err := deps.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		slog.Info("no operator Deployment to stop", "deployment", ns+"/"+name)
	} else if err != nil {
		return fmt.Errorf("operator Deployment %s/%s: %w", ns, name, err)
	} else {
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil {
			return fmt.Errorf("operator Deployment %s/%s: selector: %w", ns, name, err)
		}
		patch := []byte(`{"spec":{"replicas":0}}`)
		if _, err := deps.Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}, "scale"); err != nil {
			return fmt.Errorf("scaling the operator %s/%s to 0: %w", ns, name, err)
		}
		onTimeout := fmt.Errorf("the operator's pods (%s in %s) still run after %s", sel, ns, timeout)
		err = wait.PollUntilContextTimeout(ctx, every, timeout, true, func(ctx context.Context) (bool, error) {
			pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
			if err != nil {
				slog.Warn("listing the operator's pods", "err", err)
				return false, nil
			}
			var left []string
			for _, p := range pods.Items {
				// This hook's own pod carries the same labels; only the
				// Deployment's (through its ReplicaSets) count.
				if owner := metav1.GetControllerOf(&p); owner != nil && owner.Kind == "ReplicaSet" {
					left = append(left, p.Name)
				}
			}
			if len(left) == 0 {
				slog.Info("operator stopped", "deployment", ns+"/"+name)
				return true, nil
			}
			slog.Info("waiting for the operator to stop", "pods", strings.Join(left, ", "))
			return false, nil
		})
		if wait.Interrupted(err) {
			return onTimeout
		}
		if err != nil {
			return err
		}
	}
	err = cs.CoordinationV1().Leases(ns).Delete(ctx, lease, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting the operator's leader lease %s/%s: %w", ns, lease, err)
	}
	slog.Info("leader lease removed", "lease", ns+"/"+lease)
	return nil
}
