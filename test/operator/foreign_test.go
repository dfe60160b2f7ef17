package operator

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/release"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/fleetmirror/fleetmirror/operator/helmaction"
)

// TestOperatorLeavesForeignRelease: a release the operator did not install
// (here a plain `helm install spegel`, as Spegel's own chart makes one) is
// never upgraded, marked failed or uninstalled; the Spegel resource of the
// same name says why and how to resolve it, and deleting the resource
// leaves the release as it was.
func TestOperatorLeavesForeignRelease(t *testing.T) {
	needCluster(t)
	ctx := context.Background()
	cl, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fm-foreign"
	ensureNamespace(t, cl, ns)
	acfg, _, _ := plainInstall(t, ns, defaultSpegel)
	untouched := func(when string) {
		t.Helper()
		last, err := acfg.Releases.Last(defaultSpegel)
		if err != nil {
			t.Fatalf("%s: the foreign release: %v", when, err)
		}
		if last.Version != 1 || last.Info.Status != release.StatusDeployed || last.Labels[helmaction.OwnerLabel] != "" {
			t.Errorf("%s: the foreign release is revision %d, %s, labels %v; want revision 1, deployed, no owner", when, last.Version, last.Info.Status, last.Labels)
		}
	}

	manifests, c := renderOperator(t, loadOperatorChart(t), ns, operatorValues(t, "cks", "", nil))
	applyAll(t, cl, manifests, false)
	defer forget(t, cl, ns, defaultSpegel)
	op := startOperator(t, manifests, c, 0)
	defer op.stop(t)

	eventually(t, "the resource to name the foreign release", time.Minute, func() error {
		u := spegel(ns, defaultSpegel, nil)
		if err := cl.Get(ctx, client.ObjectKeyFromObject(u), u); err != nil {
			return err
		}
		conds := fmt.Sprint(u.Object["status"])
		if !strings.Contains(conds, helmaction.ErrForeign.Error()) || !strings.Contains(conds, "helm uninstall "+defaultSpegel+" -n "+ns) {
			return fmt.Errorf("status %s", conds)
		}
		return nil
	})
	time.Sleep(2 * time.Second) // further reconciles must not touch it either
	untouched("with the resource")

	if err := cl.Delete(ctx, spegel(ns, defaultSpegel, nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the resource deleted", time.Minute, func() error {
		err := cl.Get(ctx, client.ObjectKeyFromObject(spegel(ns, defaultSpegel, nil)), spegel(ns, defaultSpegel, nil))
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("still there: %v", err)
	})
	untouched("after the resource was deleted")
}
